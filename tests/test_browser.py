"""The dashboard as a person sees it: headless Chromium opens optuna-dashboard on a small study.

It finds the study and its trials in the rendered page, reads a trial's note, checks that the
uniform W8A8 reference (outside the study's 5-bit budget) is not shown as a best trial, and saves
screenshots. Chromium is Debian's `chromium`; when it is missing the test installs it with
apt-get (root only) and skips, saying why, only where that cannot be done.

Screenshots go to `$MPQ_TEST_ARTIFACTS` when set, else to this test's pytest temp folder; the
paths are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _search_fixtures import build_study, free_port, get_json

from mpq_search.dashboard import start_dashboard
from mpq_search.runtime import stop_child

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
APT_INSTALL = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]


def _find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _install_browser() -> str:
    """Chromium's path, installing Debian's package when it is missing (else pytest.skip)."""
    found = _find_browser()
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as "
                    "root): apt-get install -y chromium")
    for command in (APT_INSTALL, ["apt-get", "update", "-q"], APT_INSTALL):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode == 0 and command == APT_INSTALL and _find_browser():
            break
    found = _find_browser()
    if found is None:
        pytest.skip(f"chromium could not be installed with apt-get: {done.stderr[-300:]}")
    return found



@dataclass(frozen=True)
class Served:
    """A study served by optuna-dashboard, and what the test needs to look at it."""

    browser: str
    base: str
    study_id: int
    study_name: str
    w8a8: int
    trials: int
    artifacts: Path


def _artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("MPQ_TEST_ARTIFACTS")
    folder = Path(given) if given else tmp_path_factory.mktemp("browser-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    browser = _install_browser()
    root = tmp_path_factory.mktemp("browser")
    config, _, study = build_study(root, trials=3)
    w8a8 = next(t.number for t in study.trials if t.user_attrs.get("tag") == "uniform:W8A8")
    port = free_port()
    process = start_dashboard(config.storage_url, config.study_dir / "artifacts", port=port,
                              quiet=True)
    try:
        base = f"http://127.0.0.1:{port}"
        summaries = get_json(f"{base}/api/studies", time.monotonic() + 60)["study_summaries"]
        study_id = next(s["study_id"] for s in summaries
                        if s["study_name"] == config.study_name)
        yield Served(browser, base, study_id, config.study_name, w8a8, len(study.trials),
                     _artifact_dir(tmp_path_factory))
    finally:
        stop_child(process)


def _chromium(served: Served, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a page, with 15 s of virtual time for the app to fetch and draw."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [served.browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--window-size=1400,1000", "--virtual-time-budget=15000", *extra, url],
            capture_output=True, text=True, timeout=120)


def _page_text(served: Served, url: str) -> str:
    """The rendered page's visible text (scripts and styles dropped, whitespace folded)."""
    dom = _chromium(served, url, "--dump-dom").stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def _screenshot(served: Served, url: str, name: str) -> Path:
    target = served.artifacts / name
    target.unlink(missing_ok=True)
    _chromium(served, url, f"--screenshot={target}")
    print(f"screenshot: {target}")
    return target


def test_study_page_lists_trials_and_only_feasible_best_trials(served: Served) -> None:
    text = _page_text(served, f"{served.base}/dashboard/studies/{served.study_id}")
    assert served.study_name in text
    assert "Pareto Front" in text and "Best Trials" in text
    best = {int(n) for n in re.findall(r"Trial (\d+) Objective Values", text)}
    api = get_json(f"{served.base}/api/studies/{served.study_id}", time.monotonic() + 30)
    assert best == {t["number"] for t in api["best_trials"]}
    assert best and served.w8a8 not in best  # outside the 5-bit budget: never "best"
    shot = _screenshot(served, f"{served.base}/dashboard/studies/{served.study_id}",
                       "dashboard_study.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_trial_page_shows_the_note_and_no_best_chip_for_a_reference(served: Served) -> None:
    url = f"{served.base}/dashboard/studies/{served.study_id}/trials?numbers={served.w8a8}"
    text = _page_text(served, url)
    listed = {int(n) for n in re.findall(r"\bTrial (\d+) (?:Complete|Waiting|Running)", text)}
    assert set(range(served.trials)) <= listed
    header = re.search(rf"Trial {served.w8a8} \(trial_id=\d+\)(.*?) Note ", text)
    assert header is not None and "Best Trial" not in header.group(1)
    assert f"Trial {served.w8a8}: uniform:W8A8" in text  # the note, rendered from markdown
    assert "outside it" in text and "a reference, not a candidate" in text
    assert "64 layers" not in text and "W8A8 x" in text  # the tiny model's own tally
    shot = _screenshot(served, url, "dashboard_trial_w8a8.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_api_sends_constraints_and_notes(served: Served) -> None:
    """What the page draws from: Optuna 5 constraints per trial and a note per finished one."""
    detail = get_json(f"{served.base}/api/studies/{served.study_id}", time.monotonic() + 30)
    trials = {t["number"]: t for t in detail["trials"]}
    # W8A8 against a 5-bit budget: weight bits over by (8 - 5) / 5, activations within
    assert max(trials[served.w8a8]["constraints"]) == pytest.approx((8 - 5) / 5)
    finished = [t for t in trials.values() if t["state"] == "Complete"]
    assert len(finished) == 2 + 3  # the two uniform references and three trials
    for trial in finished:
        assert "FID-excess" in trial["note"]["body"]
        assert all(c <= 0 for c in trial["constraints"]) or trial["number"] == served.w8a8
