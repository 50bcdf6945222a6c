"""`amber trainer <stage> --config FILE`: one stage, in one process of a torchrun gang."""

from __future__ import annotations

import traceback
from pathlib import Path

from pydantic import ValidationError

from amber import errors
from amber.plan import StageRun
from amber.records import StageResult
from amber_trainer import runtime
from amber_trainer.stages import runner

# Metrics kept in the commit marker and the termination message: scalars and short lists.
SUMMARY_LIST_MAX = 32


class ConfigError(ValueError):
    """A stage config that cannot run; nothing has been written."""


def read_config(path: Path, stage_type: str) -> StageRun:
    try:
        run = StageRun.model_validate_json(Path(path).read_text())
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    except OSError as err:
        raise ConfigError(f"{path}: {err}") from None
    if run.stage.type != stage_type:
        raise ConfigError(f"{path} is a {run.stage.type} stage, not {stage_type}")
    return run


def summary(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if not isinstance(v, (list, dict)) or len(v) <= SUMMARY_LIST_MAX
    }


def succeeded(rt: runtime.Runtime, manifest, reused: bool = False) -> StageResult:
    return StageResult(
        stage=rt.stage,
        status="Succeeded",
        output=f"{rt.store.uri}/{manifest.folder}",
        step=manifest.step,
        metrics=manifest.metrics,
        reused=reused,
    )


def main(stage_type: str, config: Path) -> int:
    run = read_config(config, stage_type)
    rt = runtime.setup(run)
    try:
        existing = rt.output()
        if existing is not None:
            # Idempotent: a re-started stage whose output is committed is done.
            runtime.report(rt, succeeded(rt, existing, reused=True))
            return 0
        rt.log("started", index=run.index, world=rt.world, device=str(rt.device))
        out = runner(run.stage.type)(rt)
        manifest = rt.commit_output(
            rt.workdir / "output", out.step, summary(out.metrics), out.uploaded
        )
        if rt.is_main:
            runtime.report(rt, succeeded(rt, manifest))
        return 0
    except Exception as err:
        code = errors.exit_code(err)
        message = f"{type(err).__name__}: {errors.one_line(err)}"
        result = StageResult(stage=run.stage.name, status="Failed", message=message, code=code)
        runtime.report(rt, result)
        traceback.print_exc()  # into the stage's log
        return 1
    finally:
        runtime.teardown(rt)
