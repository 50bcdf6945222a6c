"""The warm stage worker: one long-lived process that runs `amber run`'s single-process
stages one after another, through the same trainer entry point a pod runs.

Starting torchrun and importing torch, diffusers and DeepSpeed costs about 10 s a stage on
two cores, more than a stage such as prune (a weight copy) works. The worker pays the
imports once per run, and its gang of one (`deepspeed.init_distributed`) stays up from one
stage to the next. A stage with more processes still runs under torchrun.

The protocol, on the worker's stdin and stdout: `amber run` writes one `Task` line; the
worker runs it, its output (event lines and logs, stdout and stderr) on its stdout, then
writes one `Done` line. End of stdin ends the worker.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

# What the worker's environment holds, where torchrun would set it: a gang of one.
GANG = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


class Task(BaseModel):
    stage_type: str
    config: str


class Done(BaseModel):
    worker: Literal["done"] = "done"
    code: int


DONE_PREFIX = '{"worker"'


def serve(invalid_exit: int) -> int:
    """The worker's loop (`amber worker`); `invalid_exit` is a stage config's exit code when
    it cannot run, as `amber trainer` exits."""
    from amber_trainer import entry  # the import this process exists to pay once

    for line in sys.stdin:
        task = Task.model_validate_json(line)
        try:
            code = entry.main(task.stage_type, Path(task.config))
        except entry.ConfigError as err:
            print(f"invalid stage config: {err}", file=sys.stderr)
            code = invalid_exit
        sys.stderr.flush()
        print(Done(code=code).model_dump_json(), flush=True)
    return 0
