"""The run report page: what it reads from a run folder, and the page in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import matplotlib
import numpy as np
import pytest
from PIL import Image

from amber import commits, history, report
from amber.plan import plan
from amber.resource import parse
from amber.storage import open_store
from trainer_helpers import tiny_resource

matplotlib.use("Agg")


def picture(path, title):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([3, 1, 2])
    ax.set_title(title)
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture
def run_folder(tmp_path):
    """A run folder part-way through: score and finetune committed (finetune after a
    resume), prune committed under another spec, the rest never run."""
    obj = parse(tiny_resource(str(tmp_path / "store")))
    runs = {r.stage.name: r for r in plan(obj)}
    store = open_store(runs["score"].run_uri)

    def commit(stage, metrics, spec_hash, files):
        src = tmp_path / "src" / stage
        src.mkdir(parents=True)
        for name, write in files.items():
            write(src / name)
        commits.commit(store, f"{stage}/output", src, 1, metrics, spec_hash)

    commit(
        "score",
        {"keep": [0, 2, 6, 9, 10, 11], "criterion": "importance", "note": "<b>bold</b>"},
        runs["score"].spec_hash,
        {"importance.png": lambda p: picture(p, "importance")},
    )
    spans = [{"student": j, "span": [2 * j, 2 * j + 1], "teacher": 2 * j} for j in range(6)]
    commit(
        "prune",
        {"layers": 6},
        "another-spec",
        {"layer_map.json": lambda p: p.write_text(json.dumps(spans))},
    )
    commit(
        "finetune",
        {"loss": [0.5 - i / 100 for i in range(40)], "finalLoss": 0.11},
        runs["finetune"].spec_hash,
        {"loss.png": lambda p: picture(p, "loss"), "notes.txt": lambda p: p.write_text("x")},
    )
    history.record(store, {"stage": "score", "status": "ran", "seconds": 3.0})
    history.record(store, {"stage": "score", "status": "reused"})
    history.record(store, {"stage": "finetune", "status": "ran", "seconds": 4.0})
    history.record(
        store, {"stage": "finetune", "status": "resumed", "resumedFrom": 20, "seconds": 2.5}
    )
    return obj, list(runs.values()), store


def test_the_report_reads_states_attempts_metrics_and_pictures(run_folder):
    obj, runs, store = run_folder
    values = report.context(obj, runs, store)
    stages = {s.name: s for s in values["stages"]}
    assert [s.name for s in values["stages"]] == [r.stage.name for r in runs]
    assert {n: s.state for n, s in stages.items()} == {
        "score": "committed",
        "prune": "stale",
        "distill": "not run",
        "finetune": "committed",
        "fuse": "not run",
        "eval": "not run",
    }
    assert values["done"] == 2 and values["final"] is None
    finetune = stages["finetune"]
    assert (finetune.attempts, finetune.seconds, finetune.resumed_from) == (2, 6.5, [20])
    assert stages["score"].attempts == 1  # a reuse is not an attempt
    assert dict(finetune.metrics) == {"finalLoss": "0.11", "loss": "0.5 → 0.11 (40)"}
    assert [f for f, _ in finetune.figures] == ["loss.png"]  # pictures only
    assert finetune.figures[0][1].startswith("data:image/png;base64,iVBOR")
    assert dict(stages["score"].metrics)["keep"] == "0, 2, 6, 9, 10, 11"
    assert values["layer_map"][5] == {"student": 5, "span": [10, 11], "teacher": 10}

    page = report.render(values)
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert page.count("<section") == len(runs) and 'id="layer-map"' in page


def test_an_operator_report_takes_attempts_from_the_stage_statuses(run_folder):
    from amber.api import StageStatus

    obj, runs, store = run_folder
    store.delete(history.KEY)  # the operator keeps no history: its status has attempts
    by = {r.stage.name: r for r in runs}
    statuses = [
        StageStatus(
            name="finetune",
            type="finetune",
            spec_hash=by["finetune"].spec_hash,
            attempts=3,
            start_time="2026-12-06T10:00:00Z",
            completion_time="2026-12-06T10:02:05Z",
        ),
        StageStatus(name="score", type="score", spec_hash="another-spec", attempts=7),
    ]
    stages = {s.name: s for s in report.context(obj, runs, store, statuses)["stages"]}
    assert (stages["finetune"].attempts, stages["finetune"].seconds) == (3, 125.0)
    assert stages["score"].attempts == 0  # a status of another spec says nothing of this one


def test_the_report_is_written_once_for_the_same_run(run_folder):
    obj, runs, store = run_folder
    uri = report.write(obj, runs, store)
    assert uri == f"{store.uri}/{report.REPORT}"
    page = store.local_path(report.REPORT)
    stamp = page.stat().st_mtime_ns
    assert report.write(obj, runs, store) == uri
    assert page.stat().st_mtime_ns == stamp  # nothing new to say: nothing written
    assert report.resource_of(store) == obj
    history.record(store, {"stage": "eval", "status": "ran", "seconds": 1.0})
    report.write(obj, runs, store)
    assert page.stat().st_mtime_ns != stamp


def test_amber_report_on_a_run_folder_or_a_resource(run_folder, tmp_path):
    obj, runs, store = run_folder
    report.write(obj, runs, store)
    out = tmp_path / "page.html"
    done = subprocess.run(
        ["amber", "report", store.uri, "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == store.read_text(report.REPORT)
    missing = subprocess.run(
        ["amber", "report", str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no resource.json" in missing.stderr


def chromium(*args, timeout=60):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "the browser tests need Chromium (./tests/run installs Debian's package)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=timeout, check=True
    )


def opened(path):
    """The page's DOM after its load handlers ran, and what its console said."""
    done = chromium("--virtual-time-budget=5000", "--dump-dom", path.as_uri())
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_the_page_opens_from_disk_in_a_real_browser(run_folder, tmp_path):
    obj, runs, store = run_folder
    page = tmp_path / "report.html"
    page.write_text(report.render(report.context(obj, runs, store)))
    dom, console = opened(page)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="2"' in body and 'data-broken-images="0"' in body, body
    assert console == []
    for run in runs:
        assert f'id="stage-{run.stage.name}"' in dom
    shot = tmp_path / "shot.png"
    chromium("--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.01  # text, tables and plots drawn

    # A page damaged in transfer: the broken picture is counted and the reader told.
    html = page.read_text()
    start = html.index("base64,") + 2000
    page.write_text(html[:start] + "!!!!" + html[start + 4 :])
    dom, _ = opened(page)
    assert 'data-broken-images="1"' in dom
    assert re.search(r'id="broken" style="display: block;"', dom), dom[:500]
