"""What `amber run` shows: a progress bar per stage, then a table of what happened."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from amber.api import AmberCompression
from amber.records import Event
from amber.report import judged_rows


def human(count: int | float | None) -> str:
    if not count:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(int(count))


WARNINGS = Console(stderr=True, soft_wrap=True)


class RunView:
    """Rich progress bars fed by the trainer's JSON events."""

    def __init__(self, console: Console, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def _task(self, stage: str, total: int | None = None) -> int:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, info="")
        return self.tasks[stage]

    def on_event(self, run, event: Event) -> None:
        stage, kind, get = run.stage.name, event.event, event.get
        if kind == "reused":
            task = self._task(stage, 1)
            self.progress.update(task, completed=1, info="[dim]reused committed output")
        elif kind == "started":
            self._task(stage)
        elif kind == "resumed":
            info = f"resumed from step {get('step')}"
            self.progress.update(self._task(stage), info=info)
        elif kind == "progress":
            info = []
            if get("loss") is not None:
                info.append(f"loss {get('loss'):.4g}")
            if get("phase") not in (None, stage):
                info.append(get("phase"))
            self.progress.update(
                self._task(stage),
                completed=get("step"),
                total=get("total"),
                info=" ".join(info),
            )
        elif kind == "warning":  # damaged commits quarantined, and the like: always shown
            WARNINGS.print(f"[yellow]warning[/] {stage}: {get('message')}", highlight=False)
        elif kind == "result":
            task = self._task(stage)
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, total=total, completed=total)


def summary(console: Console, obj: AmberCompression, outcomes, final: str | None, seconds: float):
    table = Table(title=f"{obj.metadata.namespace}/{obj.metadata.name}: {seconds:.0f}s")
    for column in ("stage", "type", "status", "time", "key metrics"):
        table.add_column(column)
    for o in outcomes:
        keys = (
            "keep",
            "layers",
            "firstLoss",
            "finalLoss",
            "singleLayers",
            "meanRelativeVelocityError",
        )
        shown = []
        for k in keys:
            if k in o.metrics:
                v = o.metrics[k]
                shown.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        status = o.status if o.resumed_from is None else f"resumed@{o.resumed_from}"
        table.add_row(o.stage, o.type, status, f"{o.seconds:.1f}s", " ".join(shown))
    console.print(table)
    judged = next((o.metrics["judged"] for o in outcomes if "judged" in o.metrics), None)
    console.print(judged_table(judged) if judged else parameters_table(outcomes))
    if final:
        console.print(f"final model: [bold]{final}[/]")


def judged_table(judged: dict) -> Table:
    """What each model draws on the held-out prompts, as the eval stage's judge scored it."""
    rows = judged_rows(judged)
    table = Table(title=f"{rows[0].prompts} held-out prompts, scored by the task's judge")
    for column in ("model", "params", "score", *rows[0].attributes):
        table.add_column(column, justify="left" if column == "model" else "right")
    teacher = rows[0].parameters
    for r in rows:
        share = f" {r.parameters / teacher:.0%}" if r.stage else ""
        table.add_row(
            r.model,
            human(r.parameters) + share,
            f"{r.score:.1%}",
            *(f"{v:.0%}" for v in r.attributes.values()),
        )
    return table


def parameters_table(outcomes) -> Table:
    """The teacher's parameters and each pruned or fused model's, with its share."""
    sizes = Table(title="parameters")
    sizes.add_column("model")
    sizes.add_column("parameters", justify="right")
    teacher = next((o.metrics.get("teacherParameters") for o in outcomes if o.type == "prune"), 0)
    if teacher:
        sizes.add_row("teacher", human(teacher))
    for o in outcomes:
        if o.type in ("prune", "fuse") and "parameters" in o.metrics:
            share = f" ({o.metrics['parameters'] / teacher:.0%})" if teacher else ""
            sizes.add_row(o.stage, human(o.metrics["parameters"]) + share)
    return sizes
