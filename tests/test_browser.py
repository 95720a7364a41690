"""The MLflow UI as a user sees it, in headless Chromium: a finished tiny CPU study (default SQLite tracking store),
served by the ``mlflow ui`` command the study printed, opened on the link it printed. The rendered runs table must
show the Pareto front with technique names and throughput, best first, on the model-training side of the UI; the
study's second saved view must show every trial and the baseline.

Chromium and chromedriver come from the system (Debian's ``chromium`` and ``chromium-driver``, which ``.ci/run``
installs); nothing is downloaded at run time. Without them the test fails, saying what to install. Screenshots go
to pytest's ``tmp_path``, never into the repository.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow_server import mlflow_process

from harness.space import techniques_label

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
INSTALL = "apt-get install -y chromium chromium-driver (Debian); .ci/run installs them"


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if p)
    out = dict(os.environ, PYTHONPATH=path, HARNESS_PLUGINS="failing_plugin", MPLBACKEND="Agg",
               MLFLOW_DISABLE_TELEMETRY="true", DS_ACCELERATOR="cpu")
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> dict:
    """A tiny study run the README's way (default ``sqlite:///mlflow.db`` in the working directory): two optimizers
    that complete, one compression fault that fails, and a baseline."""
    tmp = tmp_path_factory.mktemp("browser-study")
    study = {
        "name": "browse",
        "workload": {"name": "digits", "hidden": 32, "depth": 1},
        "axes": {"optimizer": {"adamw": {"lr": 0.01}, "sgd": {"lr": 0.1}}, "compile": ["eager"],
                 "compression": {"none": None, "fault": {"mode": "raise"}}},
        "omitted_params": "default",
        "batch_size": 64,
        "baseline": {"batch_size": 32},
        "budget": {"steps": 24, "warmup_steps": 2, "windows": 3, "noise_threshold": 0},
        "trial_timeout_s": 120,
        "objectives": [{"throughput": "max"}, {"accuracy": "max"}],
        "sampler": "grid",
        "n_trials": 4,
        "device": "cpu",
        "storage": f"sqlite:///{tmp / 'optuna.db'}",
        "output_dir": str(tmp / "out"),
    }
    (tmp / "browse.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "study", "browse.yaml"], cwd=tmp, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    loaded = optuna.load_study(study_name="browse", storage=f"sqlite:///{tmp / 'optuna.db'}")
    records = [t.user_attrs["record"] for t in loaded.get_trials()]
    return dict(tmp=tmp, stdout=proc.stdout, records=records, baseline=loaded.user_attrs["baseline"])


@pytest.fixture(scope="module")
def ui(finished_study):
    """The ``mlflow ui`` command the study printed, on a free loopback port; yields (base URL, the printed link)."""
    out = finished_study["stdout"]
    command = re.search(r"start the UI with\s+(mlflow ui --backend-store-uri \S+)", out)
    link = re.search(r"then open .*?: (http://127\.0\.0\.1:5000/\S+)", out)
    assert command and link, f"the study printed no way to the MLflow UI:\n{out[-2000:]}"
    argv = command.group(1).split()
    with mlflow_process(argv[1:], finished_study["tmp"] / "ui.log", cwd=finished_study["tmp"], env=env()) as base:
        yield base, link.group(1).replace("http://127.0.0.1:5000", base)


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by selenium through the system's chromedriver (no download, no network)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail(f"the browser test needs chromium and chromedriver on PATH: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1800,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.save_screenshot(str(tmp_path / "last.png"))  # for whoever reads a failure; never in the repo
        driver.quit()


def rendered_rows(driver, ready: Callable[[list[str]], bool], timeout: float = 60) -> list[str]:
    """The runs table's rows as rendered text (ag-grid splits a row between its pinned and scrolling parts, joined
    here by row index), once ``ready(rows)`` holds (the page first draws its default table, then the view)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        parts: dict[str, list[str]] = {}
        try:
            for el in driver.find_elements(By.CSS_SELECTOR, "[role=row][row-index]"):
                parts.setdefault(el.get_attribute("row-index"), []).append(el.text.replace("\n", " "))
        except StaleElementReferenceException:  # the table was redrawn while being read
            continue
        rows = [" ".join(parts[k]) for k in sorted(parts, key=int)]
        if rows and ready(rows):
            return rows
        if time.monotonic() > deadline:
            body = driver.find_element(By.TAG_NAME, "body").text
            pytest.fail(f"the runs table never showed what was expected; rows: {rows}; page text: {body[:1500]}")
        time.sleep(0.5)


def run_name(record: dict) -> str:
    params = record["params"]
    return f"#{record['number']} " + techniques_label(params)


def test_printed_link_opens_the_pareto_front_with_techniques_and_throughput(finished_study, ui, browser):
    from selenium.webdriver.common.by import By

    base, link = ui
    front = [r for r in finished_study["records"] if r["state"] == "COMPLETE"]
    assert len(front) >= 1
    browser.get(link)
    rows = rendered_rows(browser, lambda rows: all(" + " in row for row in rows))  # trials, not the study's run
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Pareto front, best throughput first" in body  # the saved view is the one shown
    assert "Model training" in body and "Traces" in body and "Evaluation runs" not in body  # not the GenAI pages
    headers = {el.text for el in browser.find_elements(By.CSS_SELECTOR, "[role=columnheader]")}
    assert {"throughput", "accuracy", "speedup_vs_baseline"} <= headers  # (columns further right render on scroll)
    on_front = [r for r in front if any(run_name(r) in row for row in rows)]
    assert on_front, f"no trial of the front in the table: {rows}"
    for record in on_front:
        (row,) = [row for row in rows if run_name(record) in row]
        assert repr(record["metrics"]["throughput_samples_per_s"]) in row  # the throughput, beside its techniques
    failed = [r for r in finished_study["records"] if r["state"] == "FAIL"]
    assert failed and not any(run_name(r) in row for r in failed for row in rows)  # only the front


def test_second_view_shows_every_trial_and_the_baseline_best_first(finished_study, ui, browser):
    base, link = ui
    records = [r for r in finished_study["records"] if r["duplicate_of"] is None]
    browser.get(link.replace("viewStateShareKey=pareto-", "viewStateShareKey=trials-"))
    rows = rendered_rows(browser, lambda rows: len(rows) == len(records) + 1)
    for record in records:
        assert any(run_name(record) in row for row in rows), (run_name(record), rows)
    baseline = [row for row in rows if "baseline " in row]
    assert baseline and repr(finished_study["baseline"]["metrics"]["throughput_samples_per_s"]) in baseline[0]
    # sorted by throughput, best first: the fastest complete run heads the table
    speeds = {json.dumps(r["number"]): r["metrics"]["throughput_samples_per_s"] for r in records
              if r["state"] == "COMPLETE"}
    speeds["baseline"] = finished_study["baseline"]["metrics"]["throughput_samples_per_s"]
    best = max(speeds, key=lambda k: speeds[k])
    assert repr(speeds[best]) in rows[0]
