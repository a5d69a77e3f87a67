"""A throwaway PostgreSQL cluster for fault tests: the machine's shared server must never be
restarted (other tests use it), so each test that restarts, stops or kills makes its own with
`initdb` (as the `postgres` user) in a temp folder, on a free port, and removes it afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def unavailable() -> str | None:
    """Why a throwaway cluster cannot be made here; None when it can."""
    if _binary("initdb") is None or _binary("pg_ctl") is None:
        return "PostgreSQL's initdb/pg_ctl are not installed"
    if os.geteuid() != 0 and os.environ.get("USER") != "postgres":
        return "needs root (to run initdb as the postgres user)"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """initdb + pg_ctl on a free port with trust auth; `url` is its `postgres` database."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mpq-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = _free_port()
        shutil.chown(self.base, "postgres", "postgres")
        self._as_postgres([_binary("initdb"), "-D", str(self.data), "-U", "postgres",
                           "--auth=trust", "--no-sync", "-E", "UTF8"])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, command: list[str | None], timeout: float = 120) -> None:
        args = [str(c) for c in command]
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {result.stdout}{result.stderr}")

    def _pg_ctl(self, *action: str) -> None:
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=40")
        self._as_postgres([_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                           "-o", options, "-w", "-t", "60", *action])

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        """A fast restart: every session is terminated, the server is down for a moment."""
        self._pg_ctl("restart", "-m", "fast")

    def terminate_sessions(self) -> int:
        """`pg_terminate_backend` on every other client session; how many were killed."""
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                      dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
                row = cursor.fetchone()
            return int(row[0]) if row else 0
        finally:
            connection.close()

    def remove(self) -> None:
        try:
            self._pg_ctl("stop", "-m", "immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # already stopped
        shutil.rmtree(self.base, ignore_errors=True)
