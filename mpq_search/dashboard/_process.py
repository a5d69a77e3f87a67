"""The optuna-dashboard process: its command line, and starting it as a child."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from mpq_search.dashboard._optuna_dashboard import constrain_dashboard, dashboard_main
from mpq_search.errors import StudyError
from mpq_search.search import normalise_url


def dashboard_command(storage: str, artifact_dir: str | Path | None, *, host: str = "127.0.0.1",
                      port: int = 8080) -> list[str]:
    """The command line that serves a study's storage and artifact folder with optuna-dashboard
    (through `serve_dashboard`, which keeps out-of-budget trials off its Pareto front)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise StudyError("optuna-dashboard is not installed: pip install optuna-dashboard")
    target = storage.removeprefix("journal:") if storage.startswith("journal:") else storage
    target = normalise_url(target)
    command = [sys.executable, "-c", "from mpq_search.dashboard import serve_dashboard; "
               "serve_dashboard()", target, "--host", host, "--port", str(port)]
    if artifact_dir is not None:
        Path(artifact_dir).mkdir(parents=True, exist_ok=True)
        command += ["--artifact-dir", str(artifact_dir)]
    return command


def start_dashboard(storage: str, artifact_dir: str | Path | None, *, host: str = "127.0.0.1",
                    port: int = 8080, quiet: bool = False) -> subprocess.Popen[bytes]:
    """Start optuna-dashboard as a child process (the caller waits on or terminates it)."""
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(dashboard_command(storage, artifact_dir, host=host, port=port),
                            stdout=out, stderr=out)


def serve_dashboard(argv: Sequence[str] | None = None) -> None:
    """optuna-dashboard's own command line (`argv`, default `sys.argv[1:]`), made
    constraint-aware first (`constrain_dashboard`); runs in the server process."""
    import sys

    constrain_dashboard()
    sys.argv = ["optuna-dashboard", *(sys.argv[1:] if argv is None else argv)]
    dashboard_main()
