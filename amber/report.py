"""The run report: one self-contained HTML page of what a run did.

Everything on it comes from the run folder: each stage's committed output (its metrics and
the pictures the stage drew: importance heatmap, loss curves, velocity error, sample grid),
the layer map, `history.jsonl` (attempts, times, resumed-from) and `final/`. Pictures are
inlined, so the page opens from disk with no network. The page depends only on what is
committed, never on when it was made, so a rerun that changes nothing writes nothing.
It needs no torch: the operator can write it too.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources

import jinja2

from amber import commits, history
from amber.api import AmberCompression, StageStatus, parse_timestamp
from amber.errors import InvalidInput
from amber.layout import FINAL, REPORT, RESOURCE
from amber.plan import OUTPUT, StageRun
from amber.presets import MODEL_NAMES
from amber.storage import Store

ATTEMPTS = ("ran", "resumed")  # history statuses that are a stage process having run


@dataclass
class StageView:
    """One row of the stage table and its section."""

    name: str
    type: str
    state: str  # committed | stale (another spec) | not run
    committed: str = ""
    attempts: int = 0
    seconds: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    metrics: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file, data URI)
    parameters: str = ""


@dataclass
class JudgedRow:
    """One model of an eval stage's judged table (shapes task with its judge)."""

    model: str  # teacher, or what the presets call the stage's model (10B-style, ...)
    stage: str
    parameters: int
    prompts: int
    score: float
    attributes: dict[str, float]


def judged_rows(judged: dict) -> list[JudgedRow]:
    """An eval stage's `judged` metric as table rows, the teacher first."""
    return [
        JudgedRow(
            "teacher" if stage == "teacher" else MODEL_NAMES.get(stage, stage),
            "" if stage == "teacher" else stage,
            entry["parameters"],
            entry["prompts"],
            entry["score"],
            entry["attributes"],
        )
        for stage, entry in judged.items()
    ]


JUDGED_GRID = "judged.png"  # the eval stage's grid of what each model drew


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def shown_metrics(metrics: dict) -> list[tuple[str, str]]:
    """A stage's metrics as (name, text): numbers and short lists as they are, a loss curve
    (a long list of numbers) as its first and last value and its length."""
    rows = []
    for key, value in sorted(metrics.items()):
        if isinstance(value, bool) or value is None:
            rows.append((key, str(value)))
        elif isinstance(value, int | float):
            rows.append((key, _number(value)))
        elif isinstance(value, str):
            rows.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            if len(value) > 12:
                rows.append((key, f"{_number(value[0])} → {_number(value[-1])} ({len(value)})"))
            else:
                rows.append((key, ", ".join(_number(v) for v in value)))
        elif isinstance(value, list | dict) and len(json.dumps(value)) <= 200:
            rows.append((key, json.dumps(value)))
    return rows


def _png(store: Store, key: str) -> str:
    return "data:image/png;base64," + base64.b64encode(store.read_bytes(key)).decode()


def _span(status: StageStatus) -> float:
    if not (status.start_time and status.completion_time):
        return 0.0
    start, end = (parse_timestamp(t) for t in (status.start_time, status.completion_time))
    return (end - start).total_seconds()


def stage_view(
    run: StageRun, store: Store, past: list[dict], status: StageStatus | None = None
) -> StageView:
    """A stage's row and section; attempts and time from `amber run`'s history, or from the
    operator's `status` of the stage (its Jobs) where there is no history."""
    name = run.stage.name
    params = {k: v for k, v in run.stage.dump().items() if k not in ("name", "type")}
    mine = [e for e in past if e.get("stage") == name and e.get("status") in ATTEMPTS]
    attempts = len(mine) or (status.attempts if status else 0)
    seconds = sum(e.get("seconds", 0.0) for e in mine) or (_span(status) if status else 0.0)
    view = StageView(
        name,
        run.stage.type,
        "not run",
        attempts=attempts,
        seconds=seconds,
        resumed_from=[e["resumedFrom"] for e in mine if e.get("resumedFrom") is not None],
        parameters=json.dumps(params, indent=1, sort_keys=True),
    )
    manifest = commits.read_manifest(store, f"{name}/{OUTPUT}")
    if manifest is None:
        return view
    view.state = "committed" if manifest.spec_hash == run.spec_hash else "stale"
    view.committed = _stamp(manifest.created)
    view.metrics = shown_metrics(manifest.metrics)
    view.figures = [
        (key, _png(store, f"{name}/{OUTPUT}/{key}"))
        for key in sorted(manifest.files)
        if key.endswith(".png") and key != JUDGED_GRID  # shown at the top of the page
    ]
    return view


def judged(runs: list[StageRun], store: Store) -> dict | None:
    """The last committed (current) eval stage's judged table and grid, if it has them."""
    for run in reversed(runs):
        if not run.stage.judges_models:
            continue
        folder = f"{run.stage.name}/{OUTPUT}"
        manifest = commits.read_manifest(store, folder)
        if manifest is None or manifest.spec_hash != run.spec_hash:
            continue
        if "judged" in manifest.metrics:
            rows = judged_rows(manifest.metrics["judged"])
            grid = _png(store, f"{folder}/{JUDGED_GRID}") if JUDGED_GRID in manifest.files else ""
            return {"stage": run.stage.name, "rows": rows, "grid": grid}
    return None


def layer_map(runs: list[StageRun], store: Store) -> list[dict]:
    """The last committed layer map: student block -> the teacher span it stands for."""
    for run in reversed(runs):
        key = f"{run.stage.name}/{OUTPUT}/layer_map.json"
        if store.exists(key):
            return json.loads(store.read_text(key))
    return []


def context(
    obj: AmberCompression,
    runs: list[StageRun],
    store: Store,
    statuses: list[StageStatus] | None = None,
) -> dict:
    """What the page shows, read from the run folder (and the operator's stage statuses)."""
    past = history.entries(store)
    known = {s.name: s for s in statuses or []}

    def status_of(run: StageRun) -> StageStatus | None:  # only a status of this very spec
        status = known.get(run.stage.name)
        return status if status is not None and status.spec_hash in ("", run.spec_hash) else None

    stages = [stage_view(run, store, past, status_of(run)) for run in runs]
    final = commits.read_manifest(store, FINAL)
    teacher = obj.spec.teacher
    return {
        "name": obj.metadata.name,
        "namespace": obj.metadata.namespace,
        "run_uri": store.uri,
        "teacher": teacher.uri or f"a random {teacher.num_layers}-layer config",
        "teacher_layers": teacher.num_layers,
        "recipe": obj.spec.preset or "spec.stages",
        "stages": stages,
        "layer_map": layer_map(runs, store),
        "judged": judged(runs, store),
        "final": f"{store.uri}/{FINAL}" if final is not None else None,
        "final_source": final.metrics.get("source") if final is not None else None,
        "done": sum(s.state == "committed" for s in stages),
    }


def render(values: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(
            lambda name: resources.files("amber").joinpath("templates", name).read_text()
        ),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(**values)


def _write_if_changed(store: Store, key: str, text: str) -> None:
    if not store.exists(key) or store.read_text(key) != text:
        store.write_text(key, text)


def write(
    obj: AmberCompression,
    runs: list[StageRun],
    store: Store,
    statuses: list[StageStatus] | None = None,
) -> str:
    """Write `{run}/report.html`, and the resource it reports on beside it (`amber report`
    on the folder reads it back), unless they already say the same; the page's URI."""
    _write_if_changed(store, RESOURCE, obj.model_dump_json(by_alias=True, indent=1))
    _write_if_changed(store, REPORT, render(context(obj, runs, store, statuses)))
    return f"{store.uri}/{REPORT}"


def resource_of(store: Store) -> AmberCompression:
    """The resource a run folder was last run with."""
    if not store.exists(RESOURCE):
        raise InvalidInput(f"{store.uri}: no {RESOURCE} (is it a run folder written by amber?)")
    return AmberCompression.model_validate_json(store.read_text(RESOURCE))
