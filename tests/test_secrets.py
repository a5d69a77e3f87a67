"""Names and secrets: a storage URL's password appears in no output, and a study name cannot
put the study's folder outside its root.

The end-to-end test runs a real tiny study on the test PostgreSQL with a password in its URL
(the server trusts every local login, so any password connects), through every command that
prints, writes or stores something: `run` (two worker processes, then a `--json` resume),
`report`, `report --json`, `export` (JSON and YAML), a `worker`, `dashboard` and two errors
that name the storage. Then it greps every file under the test's folder (the study root,
worker logs, report, bit maps, artifacts), everything the commands printed, the workers'
command lines and the study's stored attributes for the password.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from _search_fixtures import tiny_config, tiny_pipeline_dir, write_config_toml
from typer.testing import CliRunner, Result

from mpq_search.cli import app
from mpq_search.errors import StudyError
from mpq_search.search import (
    STORAGE_ENV,
    StudyConfig,
    check_study_name,
    display_url,
    load_study,
    make_storage,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
SECRET = "SECRET"
URL = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/test"
"""The test PostgreSQL (trust auth: the password is ignored, but must never be shown)."""
SHOWN = "postgresql://postgres:***@127.0.0.1:5432/test"


@pytest.mark.parametrize(("url", "shown"), [
    (URL, SHOWN),
    ("postgresql+psycopg2://postgres:p%40ss@db:5432/x",
     "postgresql+psycopg2://postgres:***@db:5432/x"),
    ("postgresql://postgres:SEC@RET@127.0.0.1/test", "postgresql://postgres:***@127.0.0.1/test"),
    ("postgresql://postgres:SECRET@127.0.0.1:xx/test",
     "postgresql://postgres:***@127.0.0.1:xx/test"),
    ("postgresql://:SECRET@h/d", "postgresql://:***@h/d"),
    ("postgresql://u@h/d?sslmode=require&Password=SECRET&a=1",
     "postgresql://u@h/d?sslmode=require&Password=***&a=1"),
    ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test"),
    ("postgresql://h:5432/d?application_name=a@b", "postgresql://h:5432/d?application_name=a@b"),
    ("sqlite:///studies/x/study.db", "sqlite:///studies/x/study.db"),
    ("journal:/tmp/a:b@c.log", "journal:/tmp/a:b@c.log"),
])
def test_display_url_hides_the_password_only(url: str, shown: str) -> None:
    """The password goes, wherever it sits (also in a URL SQLAlchemy cannot parse: a bad port
    is exactly the URL an error message shows); a URL without one is shown as given."""
    assert display_url(url) == shown


def test_errors_that_name_the_storage_hide_its_password() -> None:
    """A URL that cannot be opened, and a study the storage lacks: both messages name it."""
    with pytest.raises(StudyError) as opened:
        make_storage(URL.replace(":5432", ":xx"))
    assert "postgres:***@127.0.0.1:xx" in str(opened.value) and SECRET not in str(opened.value)
    with pytest.raises(StudyError) as missing:
        load_study(f"no-such-study-{uuid.uuid4().hex[:12]}", URL)
    assert SHOWN in str(missing.value) and SECRET not in str(missing.value)


@pytest.mark.parametrize("name", ["mnist-ddpm-4.5bits", "exp:1", "...", "a b", "x.."])
def test_study_names_that_stay_one_folder_are_accepted(name: str) -> None:
    assert check_study_name(name) == name
    assert StudyConfig(study=name, root="/abs/root").study_dir.parent == Path("/abs/root")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "C:x", "C:",
                                  "a\0b", "x/"])
def test_study_names_that_leave_the_root_are_refused(name: str) -> None:
    """At the config (every command builds one) and at a worker's boundary (`check_study_name`,
    before it waits for the study)."""
    with pytest.raises(StudyError, match="must be one folder name under the root"):
        StudyConfig(study=name)
    with pytest.raises(StudyError, match="must be one folder name under the root"):
        check_study_name(name)


@pytest.mark.parametrize("root", ["", "a\0b"])
def test_roots_that_are_no_path_are_refused(root: str) -> None:
    """An absolute root or `..` is the user's choice; NUL and empty are not paths."""
    with pytest.raises(StudyError, match="root must be a folder"):
        StudyConfig(root=root)


def test_dashboard_binds_to_this_machine_by_default() -> None:
    """The dashboard shows the study to whoever reaches it: 127.0.0.1 unless --host says so."""
    from mpq_search.dashboard import dashboard_command

    command = dashboard_command("sqlite:///x.db", None)
    assert command[command.index("--host") + 1] == "127.0.0.1"


@dataclass
class Secrets:
    """A finished study on PostgreSQL and everything its commands printed."""

    root: Path
    name: str
    outputs: dict[str, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    """Command lines of the processes the run started (its workers)."""
    dashboard: dict[str, Any] = field(default_factory=dict)


def _invoke(secrets: Secrets, label: str, args: list[str], *, code: int = 0,
            env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(app, args, env=env)
    secrets.outputs[label] = result.output  # stdout and stderr
    assert result.exit_code == code, (label, result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secrets]:
    """Every command that prints or writes, on one tiny PostgreSQL study with a password."""
    tmp = tmp_path_factory.mktemp("secrets")
    model_dir = tiny_pipeline_dir(tmp)
    config = tiny_config(model_dir, tmp, trials=2, n=4, steps=2, calib_steps=2,
                         calib_timesteps=2)
    toml = write_config_toml(config, tmp / "tiny.toml")  # no storage in it: given below
    found = Secrets(tmp, f"mpq-secrets-{uuid.uuid4().hex[:12]}")
    root = ["--root", str(tmp / "studies")]
    study = ["--study", found.name, "--storage", URL, *root]
    popen = subprocess.Popen

    def recording(args: Any, *rest: Any, **kwargs: Any) -> Any:
        found.commands.append(" ".join(map(str, args)))
        return popen(args, *rest, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(subprocess, "Popen", recording)
            _invoke(found, "run", ["run", "--config", str(toml), *study, "--workers", "2"])
        resumed = _invoke(found, "run --json", ["run", "--config", str(toml), *study, "--json"])
        found.outputs["run --json stdout"] = resumed.stdout
        _invoke(found, "report", ["report", *study])
        _invoke(found, "report --json", ["report", *study, "--json"])
        _invoke(found, "export", ["export", *study, "--best", "-o", str(tmp / "best.json")])
        _invoke(found, "export yaml", ["export", *study, "--trial", "0", "--format", "yaml",
                                       "-o", str(tmp / "t0.yaml")])
        _invoke(found, "worker", ["worker", "--study", found.name, *root, "--trials", "1",
                                  "--wait", "0", "--quiet"], env={STORAGE_ENV: URL})
        _invoke(found, "no such study", ["report", "--study", "nope", "--storage", URL], code=2)
        _invoke(found, "bad port", ["report", "--study", found.name, "--storage",
                                    URL.replace(":5432", ":xx")], code=2)
        with pytest.MonkeyPatch.context() as patch:
            import mpq_search.dashboard

            def fake_start(storage: str, artifacts: Any, **kwargs: Any) -> Any:
                found.dashboard.update(kwargs)
                return subprocess.Popen(["true"])

            patch.setattr(mpq_search.dashboard, "start_dashboard", fake_start)
            _invoke(found, "dashboard", ["dashboard", *study])
        yield found
    finally:
        try:
            optuna.delete_study(study_name=found.name, storage=make_storage(URL))
        except KeyError:
            pass


@pytest.mark.slow
def test_the_password_appears_in_no_output_file_or_stored_attribute(secrets: Secrets) -> None:
    """Nothing any command printed, no file under the test's folder, no worker's command line
    and no attribute the study stores (optuna-dashboard shows them) holds the password."""
    leaks = {label: text for label, text in secrets.outputs.items()
             if SECRET in "".join(text.split())}  # also across a wrapped line
    assert not leaks, leaks
    files = [p for p in secrets.root.rglob("*") if p.is_file()]
    logs = [p for p in files if p.parent.name == "workers"]
    assert len(logs) == 2 and all("worker ran" in p.read_text() for p in logs), logs
    assert {"report.json", "pareto.csv", "pareto.html", "best.json", "t0.yaml"} <= \
        {p.name for p in files}
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
    workers = [c for c in secrets.commands if " mpq_search worker " in c]
    assert len(workers) == 2 and not [c for c in secrets.commands if SECRET in c]
    study = load_study(secrets.name, URL)
    assert SECRET not in json.dumps(study.user_attrs, default=str)
    assert study.user_attrs["config"]["storage"] == SHOWN


@pytest.mark.slow
def test_outputs_show_the_storage_without_its_password(secrets: Secrets) -> None:
    """Where a command names the storage, it shows it (so the user knows which), password
    hidden; the dashboard stays on 127.0.0.1."""
    out = secrets.outputs
    assert SHOWN in " ".join(out["run"].split())
    assert json.loads(out["run --json stdout"])["storage"] == SHOWN
    assert f"of study {secrets.name!r} in {SHOWN}" in " ".join(out["worker"].split())
    assert SHOWN in " ".join(out["no such study"].split())
    assert "postgres:***@127.0.0.1:xx" in " ".join(out["bad port"].split())
    report = secrets.root / "studies" / secrets.name / "report" / "report.json"
    assert json.loads(report.read_text())["attrs"]["config"]["storage"] == SHOWN
    assert secrets.dashboard["host"] == "127.0.0.1"
    assert "http://127.0.0.1:8080 (this machine only" in out["dashboard"]
