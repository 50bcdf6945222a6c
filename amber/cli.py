"""The `amber` command line.

Commands import their heavy dependencies (torch, diffusers) only when they run, so the
operator image, which has neither, can still use `amber crd` and `amber validate`.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

import amber
from amber import resource
from amber.errors import EXIT_CODES, INTERRUPTED, AmberError, InvalidInput, exit_code, one_line

console = Console()
errors = Console(stderr=True, soft_wrap=True)

EXIT_INVALID = InvalidInput.code


class Commands(TyperGroup):
    """Every command's failures end here: an AmberError is one line and its class's exit
    code, and so is the machine refusing a file (a full or read-only disk, permissions);
    anything else is a bug, said so in one line (the traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except AmberError as err:
            first, *rest = str(err).splitlines() or [type(err).__name__]
            errors.print(f"[bold red]error[/] {escape(first)}", highlight=False)
            for line in rest:
                errors.print(line, markup=False, highlight=False)
            raise typer.Exit(err.code) from None
        except KeyboardInterrupt:
            errors.print("interrupted: run the same command again to continue")
            raise typer.Exit(INTERRUPTED) from None
        except OSError as err:
            if exit_code(err) is None or (ctx.obj or {}).get("debug"):
                raise _internal(err, ctx) from None
            # The machine refused (a full or read-only disk, permissions): not a bug.
            errors.print(f"[bold red]error[/] {escape(one_line(err))}", highlight=False)
            raise typer.Exit(exit_code(err)) from None
        except Exception as err:
            raise _internal(err, ctx) from None


def _internal(err: Exception, ctx: click.Context) -> Exception:
    """A bug: said in one line (typer.Exit 1), or the exception itself with --debug."""
    if (ctx.obj or {}).get("debug"):
        return err
    errors.print(
        f"[bold red]internal error[/] {escape(type(err).__name__)}: "
        f"{escape(str(err).splitlines()[0] if str(err) else '')} (a bug in Amber; "
        "--debug shows the traceback)",
        highlight=False,
    )
    return typer.Exit(1)


app = typer.Typer(
    name="amber",
    help="Compress MMDiT text-to-image transformers (Qwen-Image 20B -> Amber-Image 10B / 6B).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=Commands,
    epilog="Exit codes: "
    + "; ".join(f"{code} {meaning.split(' (')[0]}" for code, meaning in EXIT_CODES.items()),
)


@app.callback()
def options(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="AMBER_DEBUG", help="Tracebacks for internal errors.")
    ] = False,
) -> None:
    ctx.obj = {"debug": debug}


class Output(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def load_or_exit(path: Path) -> resource.AmberCompression:
    """The resource in `path`; an invalid one prints each field and reason, exit code 2."""
    try:
        return resource.load(path)
    except resource.InvalidResource as err:
        errors.print(f"[bold red]invalid resource[/] {escape(str(path))}:", highlight=False)
        for line in str(err).splitlines():
            errors.print(f"  {line}", markup=False, highlight=False)
        raise typer.Exit(EXIT_INVALID) from None


@app.command()
def version() -> None:
    """Print Amber's version."""
    console.print(amber.__version__)


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="An AmberCompression YAML file.")],
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.table,
) -> None:
    """Check a resource file and print the stages it resolves to."""
    obj = load_or_exit(file)
    stages = [s.dump() for s in obj.spec.pipeline()]
    if output is Output.json:
        print(json.dumps(stages, indent=2))
        return
    if output is Output.yaml:
        print(yaml.safe_dump(stages, sort_keys=False), end="")
        return
    table = Table(title=f"{obj.metadata.namespace}/{obj.metadata.name}: valid")
    for column in ("#", "name", "type", "parameters"):
        table.add_column(column)
    for i, stage in enumerate(stages):
        params = {k: v for k, v in stage.items() if k not in ("name", "type")}
        table.add_row(str(i), stage["name"], stage["type"], json.dumps(params)[:100])
    console.print(table)


@app.command()
def crd(
    keep_on_uninstall: Annotated[
        bool, typer.Option(help="Annotate for Helm to keep it on uninstall (the chart's copy).")
    ] = False,
) -> None:
    """Print the AmberCompression CustomResourceDefinition (generated from the types)."""
    from amber.schema import crd as build_crd

    doc = build_crd()
    if keep_on_uninstall:
        annotations = doc["metadata"].setdefault("annotations", {})
        annotations["helm.sh/resource-policy"] = "keep"
    print(yaml.safe_dump(doc, sort_keys=False), end="")


@app.command()
def inspect(
    preset: Annotated[str, typer.Option(help="amber-10b or amber-6b.")] = "amber-6b",
    model: Annotated[str, typer.Option(help="Teacher config: qwen-image or tiny.")] = "qwen-image",
    file: Annotated[
        Path | None, typer.Option(help="Take the teacher and stages from a resource instead.")
    ] = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.table,
) -> None:
    """Parameter counts of the teacher and of each model a recipe produces (no weights needed)."""
    from amber import progress
    from amber.presets import PRESETS
    from amber_trainer.costs import sizes
    from amber_trainer.model import models

    if file is not None:
        obj = load_or_exit(file)
        stages = obj.spec.pipeline()
        given = obj.spec.teacher.config
        config = given.given() if given else models.named_config("qwen-image")
        label = f"{file}"
    else:
        if preset not in PRESETS:
            errors.print(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
            raise typer.Exit(EXIT_INVALID)
        try:
            config = models.named_config(model)
        except ValueError as err:
            errors.print(f"--model: {err}")
            raise typer.Exit(EXIT_INVALID) from None
        from amber import presets

        stages = presets.build(preset, config.get("num_layers", 60), {})
        label = f"{preset} on {model}"
    rows = sizes.recipe_sizes(config, stages)
    if output is not Output.table:
        text = json.dumps(rows, indent=2) if output is Output.json else yaml.safe_dump(rows)
        print(text)
        return
    table = Table(title=f"{label}: parameters")
    for column in ("model", "dual blocks", "single blocks", "parameters", "of teacher"):
        table.add_column(column, justify="right" if column != "model" else "left")
    teacher = rows[0]["parameters"]
    for row in rows:
        table.add_row(
            row["model"],
            str(row["dual_blocks"]),
            str(row["single_blocks"]),
            progress.human(row["parameters"]),
            f"{row['parameters'] / teacher:.1%}",
        )
    console.print(table)


def parse_bytes(text: str) -> float:
    """'80GiB', '141GB', '80Gi' or a number of bytes."""
    units = {"gib": 2**30, "gi": 2**30, "gb": 1e9, "g": 1e9, "mib": 2**20, "mb": 1e6}
    lowered = text.strip().lower()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if lowered.endswith(unit):
            return float(lowered[: -len(unit)]) * scale
    return float(lowered)


def cost_record(row, limit: float) -> dict:
    """One stage's line of `amber plan -o json`: its memory in GiB, whether it fits."""
    mem = row.memory
    return {
        "stage": row.run.stage.name,
        "type": row.run.stage.type,
        "gpus": row.world,
        "memoryGiB": {
            k: round(v / 2**30, 2) for k, v in mem.as_dict().items() if isinstance(v, float)
        }
        if mem
        else None,
        "fits": row.fits(limit),
        "gpuHours": None if row.gpu_hours is None else round(row.gpu_hours, 1),
    }


def print_costs(title: str, records: list[dict], rows: list, limit: float) -> None:
    """`amber plan`'s table: memory per GPU by kind, coloured by how full the GPU is."""
    table = Table(title=title)
    columns = ("stage", "GPUs", "teacher", "weights", "grads", "optim", "activ", "peak")
    for column in (*columns, "%GPU", "GPU-h"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for r, row in zip(records, rows, strict=True):
        m = r["memoryGiB"]
        cells = ["-"] * 7
        if m:
            share = row.memory.total / limit
            color = "red" if share > 1 else "yellow" if share > 0.9 else "green"
            kinds = ("teacher", "weights", "gradients", "optimizer", "activations")
            cells = [f"{m[k]:.1f}" for k in kinds]
            cells += [f"[{color}]{m['total']:.1f}[/]", f"[{color}]{share:.0%}[/]"]
        hours = "-" if r["gpuHours"] is None else f"{r['gpuHours']:.1f}"
        table.add_row(r["stage"], str(r["gpus"]), *cells, hours)
    Console(width=max(console.width, 100)).print(table)
    total = sum(r.gpu_hours or 0.0 for r in rows)
    console.print(
        f"total {total:.0f} GPU-hours at the throughput measured on one H200"
        + (" (encode not counted: it scales with the dataset)" if rows[0].flops is None else "")
    )
    for r, row in zip(records, rows, strict=True):
        if row.memory and r["fits"] and row.memory.total > 0.9 * limit:
            errors.print(f"[yellow]warning[/] {r['stage']}: over 90% of GPU memory")


@app.command("plan")
def plan_command(
    file: Annotated[Path, typer.Argument(help="An AmberCompression YAML file.")],
    gpus_per_pod: Annotated[
        int | None, typer.Option(help="GPUs per pod for every stage (default: the resource's).")
    ] = None,
    gpu_memory: Annotated[str, typer.Option(help="Memory of one GPU, e.g. 80GiB.")] = "80GiB",
    resolution: Annotated[
        int | None, typer.Option(help="Image side (default: the encode stage's).")
    ] = None,
    text_tokens: Annotated[
        int | None, typer.Option(help="Text tokens per sample (default: the encode cap).")
    ] = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.table,
) -> None:
    """Per-GPU memory of each training stage and GPU-hours of the recipe; exit 1 when a stage
    will not fit."""
    from amber_trainer.costs import budget

    obj = load_or_exit(file)
    try:
        limit = parse_bytes(gpu_memory)
    except ValueError:
        errors.print(f"--gpu-memory: cannot read {gpu_memory!r}; write e.g. 80GiB")
        raise typer.Exit(EXIT_INVALID) from None
    rows = budget.costs(obj, gpus_per_pod, resolution, text_tokens)
    records = [cost_record(row, limit) for row in rows]
    too_big = [r for r in records if not r["fits"]]
    if output is not Output.table:
        text = json.dumps(records, indent=2) if output is Output.json else yaml.safe_dump(records)
        print(text)
    else:
        print_costs(f"{file}: GiB per {gpu_memory} GPU, and GPU-hours", records, rows, limit)
    for r in too_big:
        errors.print(
            f"[bold red]will not fit[/] {r['stage']}: {r['memoryGiB']['total']:.1f} GiB per GPU "
            f"> {gpu_memory}; more GPUs (ZeRO shards by world size), a higher zeroStage, "
            "activationCheckpointing or a smaller microBatchSize"
        )
    if too_big:
        raise typer.Exit(1)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="An AmberCompression YAML file.")],
    store: Annotated[
        str | None, typer.Option(help="Storage URI instead of spec.storage.uri (path or s3://).")
    ] = None,
    stages: Annotated[
        str | None, typer.Option(help="Comma-separated stage names to run (inputs must exist).")
    ] = None,
    from_stage: Annotated[
        str | None, typer.Option("--from-stage", help="Re-run this stage and all after it.")
    ] = None,
    nproc: Annotated[
        int | None, typer.Option(help="Processes per stage (default: one per GPU, else one).")
    ] = None,
    wait: Annotated[
        float,
        typer.Option(help="Seconds to wait while another run holds this resource's folder."),
    ] = 0.0,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.table,
) -> None:
    """Run a resource's whole pipeline on this machine; re-running continues where it stopped."""
    from amber import local, progress, report
    from amber.api import StorageSpec

    obj = load_or_exit(file)
    if store is not None:
        try:
            StorageSpec(uri=store)
        except ValidationError as err:
            problems = "; ".join(resource.format_errors(err))
            raise InvalidInput(f"--store: {problems.removeprefix('uri: ')}") from None
    only = [s.strip() for s in stages.split(",")] if stages else None
    view = progress.RunView(console, enabled=output is Output.table)
    started = time.perf_counter()

    def waiting(holder) -> None:
        errors.print(f"waiting: {holder.describe()}", markup=False, highlight=False)

    with local.stop_signals_raise(), view:
        outcomes, final = local.run_resource(
            obj, store, only, from_stage, nproc, view.on_event, wait=wait, on_wait=waiting
        )
    seconds = time.perf_counter() - started
    page = f"{local.run_folder(local.with_store(obj, store)).uri}/{report.REPORT}"
    if output is Output.table:
        progress.summary(console, obj, outcomes, final, seconds)
        console.print(f"report: [bold]{page}[/]")
    else:
        summary = {
            "resource": f"{obj.metadata.namespace}/{obj.metadata.name}",
            "seconds": round(seconds, 2),
            "stages": local.outcome_dicts(outcomes),
            "final": final,
            "report": page,
        }
        print(json.dumps(summary, indent=2) if output is Output.json else yaml.safe_dump(summary))


@app.command("report")
def report_command(
    run: Annotated[
        str, typer.Argument(help="A resource file, or a run folder (a path or an s3:// URI).")
    ],
    store: Annotated[
        str | None, typer.Option(help="With a resource file: its storage URI instead.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the page here, not in the folder.")
    ] = None,
) -> None:
    """Write a run's report page: stages, pictures, layer map, metrics; one HTML file."""
    from amber import local, report
    from amber.plan import plan
    from amber.storage import open_store

    if Path(run).is_file():
        obj = local.with_store(load_or_exit(Path(run)), store)
        folder = local.run_folder(obj)
    else:
        folder = open_store(run)
        obj = report.resource_of(folder)
    runs = plan(obj)
    if out is None:
        console.print(f"wrote {report.write(obj, runs, folder)}")
    else:
        out.write_text(report.render(report.context(obj, runs, folder)))
        console.print(f"wrote {out}")


@app.command()
def generate(
    model: Annotated[Path, typer.Option(help="A final/ folder, or a diffusers pipeline folder.")],
    prompt: Annotated[list[str], typer.Option(help="What to draw (repeat for a grid's rows).")],
    out: Annotated[Path, typer.Option(help="Where to write the PNG.")] = Path("amber.png"),
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side (latent side for a bare model).")] = 16,
    compare: Annotated[
        Path | None,
        typer.Option(help="Another model (the teacher): its images beside these, same noise."),
    ] = None,
) -> None:
    """Sample an image from a compressed model, or a grid beside another model's."""
    from amber_trainer.model.generate import generate as run_generate

    for option, folder in (("--model", model), ("--compare", compare)):
        if folder is not None and not folder.exists():
            errors.print(f"{option}: {folder} does not exist")
            raise typer.Exit(EXIT_INVALID)
    console.print(f"wrote {run_generate(model, prompt, out, steps, seed, size, compare)}")


@app.command()
def trainer(
    stage: Annotated[str, typer.Argument(help="Stage type: score, prune, distill, ...")],
    config: Annotated[Path, typer.Option(help="The rendered stage config (JSON).")],
) -> None:
    """Run one stage in this process (launched by torchrun, one process per GPU)."""
    import os

    from amber import local
    from amber_trainer import entry

    local.stop_signals_exit()
    if os.environ.get(local.PARENT_DEATH_ENV):  # `amber run`'s stages die with torchrun
        parent = os.getppid()
        local.die_with_parent(int(os.environ[local.PARENT_DEATH_ENV]))
        if os.getppid() != parent:  # it died before we asked
            raise typer.Exit(1)

    try:
        code = entry.main(stage, config)
    except entry.ConfigError as err:
        errors.print(f"invalid stage config: {err}", markup=False)
        raise typer.Exit(EXIT_INVALID) from None
    raise typer.Exit(code)


@app.command(hidden=True)
def worker(
    logs: Annotated[Path, typer.Argument(help="The run's log folder (stage configs).")],
) -> None:
    """`amber run`'s warm worker: runs the stages it is sent on stdin (see `amber.worker`)."""
    import os

    from amber import local
    from amber import worker as warm

    local.stop_signals_exit()
    parent = os.getppid()
    local.die_with_parent()
    if os.getppid() != parent:  # it died before we asked
        raise typer.Exit(1)
    raise typer.Exit(warm.serve(EXIT_INVALID))


@app.command()
def operator(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch these namespaces only.")
    ] = None,
    peering: Annotated[
        str | None, typer.Option(help="kopf peering name: replicas elect one active operator.")
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(
            help="Peering priority; the highest live replica is active. Default: random, "
            "as kopf freezes every replica when two share one."
        ),
    ] = None,
    peering_lifetime: Annotated[
        int,
        typer.Option(
            min=2,
            help="Seconds a replica's peering record lives unrenewed: a standby takes over "
            "at most this long after the active replica dies (at once when it stops cleanly).",
        ),
    ] = 60,
    liveness_port: Annotated[int, typer.Option(help="Port of /healthz (0: off).")] = 8080,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (0: off).")] = 9090,
    json_logs: Annotated[bool, typer.Option(help="Structured JSON log lines.")] = False,
    timer_only: Annotated[
        bool,
        typer.Option(
            hidden=True,
            help="React to the timer alone, not to Jobs' ends nor at retry times: the "
            "behaviour bench/operator_scale.py compares against.",
        ),
    ] = False,
) -> None:
    """Run the Kubernetes operator (all namespaces unless --namespace is given)."""
    import os
    import secrets
    import socket

    import kopf

    from amber_operator import handlers
    from amber_operator.settings import from_environment

    ours = from_environment(metrics_port=metrics_port)  # the chart's values, then the options
    handlers.register(ours)

    kopf.configure(log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL)
    from amber_operator.peering import Peering

    settings = kopf.OperatorSettings()
    settings.peering.lifetime = peering_lifetime
    memo = kopf.Memo(peering=None, timer_only=timer_only, settings=ours)
    identity = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    if peering is not None:
        if priority is None:
            priority = secrets.randbelow(2**31 - 2) + 1
        memo.peering = Peering(peering, identity, priority, clusterwide=not namespace)
    kopf.run(
        settings=settings,
        memo=memo,
        identity=identity,
        clusterwide=not namespace,
        namespaces=namespace or (),
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )
