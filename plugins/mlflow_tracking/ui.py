"""Opening a study in the MLflow 3 UI on its answer: two saved views of the experiment's runs table and the link
printed at the end of a study.

MLflow 3's experiment page keeps a saved view as an experiment tag ``mlflow.sharedViewState.<id>`` whose value is
``{"name", "createdAt", "updatedAt", "state"}``, ``state`` being the page's JSON state (``searchFilter``,
``orderByKey`` as the column's canonical key ``metrics.`throughput```, ``orderByAsc``, ``selectedColumns``). The
views appear under *Views* in the runs table, and ``?viewStateShareKey=<id>`` opens one. The page opens on GenAI
traces unless ``workflowType=machine_learning`` is in the URL (MLflow 3.17 decides by that switch, the *Model
training* toggle of the sidebar, rather than by the experiment's ``mlflow.experimentKind`` tag).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import quote, urlencode

from harness.redact import mask_credentials
from harness.space import AXES

#: where ``mlflow ui`` listens unless told otherwise
DEFAULT_UI = "http://127.0.0.1:5000"
#: the experiment-tag prefix of MLflow 3's saved views
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: the page's switch between GenAI and model-training pages
TRAINING_WORKFLOW = {"workflowType": "machine_learning"}


def _quoted(value: str) -> str | None:
    return None if "'" in value else f"'{value}'"


def view_state(search_filter: str, sort_metric: str | None, ascending: bool, params: Sequence[str],
               metrics: Sequence[str], tags: Sequence[str] = ()) -> dict[str, object]:
    """The runs table's state: a filter, the order by a metric, and the columns shown (params, metrics, tags)."""
    columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics] + [f"tags.`{t}`" for t in tags]
    state: dict[str, object] = {"searchFilter": search_filter, "lifecycleFilter": "Active", "startTime": "ALL",
                                "selectedColumns": columns}
    if sort_metric:
        state.update(orderByKey=f"metrics.`{sort_metric}`", orderByAsc=ascending)
    return state


def saved_views(study: str, parent_run_id: str, objectives: Sequence[tuple[str, str]], extra_metrics: Sequence[str],
                now_ms: int) -> dict[str, str]:
    """The experiment tags of two saved views of a study: ``pareto-<run>`` (the front, best first objective first)
    and ``trials-<run>`` (every trial and the baseline), each showing the technique of every axis, the batch size,
    the objectives and ``extra_metrics``. ``objectives`` are (name, direction) pairs."""
    first, direction = objectives[0] if objectives else (None, "maximize")
    ascending = direction == "minimize"
    metrics = [name for name, _ in objectives] + [m for m in extra_metrics if m not in dict(objectives)]
    params = [*AXES, "batch_size"]
    same_study = f" and tags.`harness.study` = {_quoted(study)}" if _quoted(study) else ""
    views = {
        f"pareto-{parent_run_id}": (f"{study}: Pareto front, best {first} first",
                                    view_state(f"tags.pareto = 'true'{same_study}", first, ascending, params, metrics)),
        f"trials-{parent_run_id}": (f"{study}: all trials and the baseline",
                                    view_state(f"tags.`harness.role` != 'study'{same_study}", first, ascending,
                                               params, metrics, ["harness.failure_class"]))}
    return {VIEW_TAG_PREFIX + key: json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms,
                                               "state": json.dumps(state)})
            for key, (name, state) in views.items()}


def view_url(base: str, experiment_id: str, view_key: str) -> str:
    """The link that opens saved view ``view_key`` (the tag name less its prefix) of the experiment at ``base``."""
    query = urlencode({**TRAINING_WORKFLOW, "viewStateShareKey": view_key}, quote_via=quote)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def where_to_look(uri: str, experiment_id: str, view_key: str, view_name: str) -> list[str]:
    """The lines printed at the end of a study: the link to the Pareto view, and for a store that is not a server
    the command that serves it."""
    if uri.startswith(("http://", "https://")):
        return [f"MLflow: {view_name}: {mask_credentials(view_url(uri, experiment_id, view_key))}"]
    return [f"MLflow: start the UI with  mlflow ui --backend-store-uri {mask_credentials(uri)}",
            f"then open {view_name}: {view_url(DEFAULT_UI, experiment_id, view_key)}"]
