"""A throwaway PostgreSQL server for the tests: a fresh cluster (initdb) in a temporary directory, listening only
on a free loopback port, stopped (immediate mode) when the test module ends.

The server comes from Debian's ``postgresql`` package (``.ci/run`` installs it on a fresh machine). PostgreSQL
refuses to run as root, so under root the cluster is created and started as the package's ``postgres`` user.
Not finding the server fails the tests that need it: a study shared through a server database is a feature,
not an option.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness.launch import free_port

USER, PASSWORD = "harness", "s3cret-pw"


def server_bin() -> Path:
    """The directory of Debian's PostgreSQL server programs (initdb, pg_ctl, postgres)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server not installed: `apt-get install -y postgresql` (.ci/run does this)")
    return Path(found[-1]).parent


class PostgresServer:
    """``start()`` a cluster in a new directory under the system's temporary directory (the ``postgres`` user
    must reach it, which a test's private tmp_path does not allow); ``url(db)`` is a SQLAlchemy URL with a
    password; ``stop()`` stops the server and removes the directory."""

    def __init__(self) -> None:
        self.root, self.port = Path(tempfile.mkdtemp(prefix="harness-pg-")), free_port()
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.bin = server_bin()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(args[:1])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    def start(self) -> PostgresServer:
        self.root.chmod(0o755)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                  "start")  # -w: returns once the server accepts connections
        return self

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
