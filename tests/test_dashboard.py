"""`mpq-search dashboard`: optuna-dashboard on 127.0.0.1 lists the study, its trials, artifacts."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _search_fixtures import build_study, free_port, get_json

from mpq_search.dashboard import dashboard_command, start_dashboard
from mpq_search.runtime import stop_child

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")



def test_dashboard_lists_study_and_trials(tmp_path: Path) -> None:
    config, _, study = build_study(tmp_path, trials=2)
    port = free_port()
    command = dashboard_command(config.storage_url, config.study_dir / "artifacts", port=port)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    process = start_dashboard(config.storage_url, config.study_dir / "artifacts", port=port,
                              quiet=True)
    try:
        deadline = time.monotonic() + 60
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", deadline)["study_summaries"]
        names = {s["study_name"]: s["study_id"] for s in studies}
        assert config.study_name in names
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{names[config.study_name]}",
                      deadline)
        assert len(detail["trials"]) == len(study.trials)
        # 2 baselines + 2 trials ran; the priors beyond the count wait for a resume
        assert sum(t["state"] != "Waiting" for t in detail["trials"]) == 4
        artifacts = [a for t in detail["trials"] for a in t.get("artifacts", [])]
        assert {a["mimetype"] for a in artifacts} == {"image/png", "application/json"}
    finally:
        stop_child(process)


def test_sigterm_to_the_dashboard_command_stops_its_server(tmp_path: Path) -> None:
    """A process manager stops `mpq-search dashboard` with SIGTERM: the optuna-dashboard server
    it started must stop with it, not keep the port."""
    import signal
    import subprocess
    import sys

    config, _, _ = build_study(tmp_path, trials=1)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mpq_search", "dashboard", "--study", config.study_name,
         "--root", config.root, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        get_json(f"http://127.0.0.1:{port}/api/studies", time.monotonic() + 60)  # server is up
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM  # 143, as `run` exits
        deadline = time.monotonic() + 15
        while True:  # the port must close: the server child is gone
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                break
            assert time.monotonic() < deadline, "the dashboard server outlived its command"
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.kill()


def test_adapter_private_names() -> None:
    """Every private optuna-dashboard name `dashboard._optuna_dashboard` uses is still there,
    with the shape it is used with, and a note round-trips through the duck-typed trial: an
    optuna-dashboard upgrade that moves one fails here, not on a user's screen."""
    import inspect

    import optuna
    import optuna_dashboard._app as dashboard_app
    import optuna_dashboard._cli as dashboard_cli
    import optuna_dashboard._serializer as serializer

    from mpq_search.dashboard import constrain_dashboard
    from mpq_search.dashboard._optuna_dashboard import get_note, save_note

    assert list(inspect.signature(dashboard_cli.main).parameters) == []
    pareto = inspect.signature(dashboard_app.get_pareto_front_trials).parameters
    assert list(pareto)[:2] == ["trials", "directions"]
    serialize = inspect.signature(serializer.serialize_frozen_trial).parameters
    assert list(serialize)[:2] == ["study_id", "trial"]
    constrain_dashboard()
    assert getattr(dashboard_app.get_pareto_front_trials, "_mpq_feasible", False)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    first, second = study.get_trials()
    assert get_note(study, first) == ""
    save_note(study, first, "## a note")
    assert get_note(study, first) == "## a note" and get_note(study, second) == ""
