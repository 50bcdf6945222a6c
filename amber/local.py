"""`amber run`: a resource's whole pipeline on this machine, no cluster.

The stages are planned exactly as the operator plans them (`amber.plan`), and each runs the
same trainer entry point a pod runs: a stage of one process in the run's warm worker
(`amber.worker`, started once), one of more as a local `torchrun` process group. Re-running
after an interruption continues: stages whose committed output matches their spec hash are
reused (after `commits.read_output` checked them: a damaged one is quarantined and its stage
re-runs), the interrupted stage resumes from its newest good checkpoint, and a changed stage
re-runs together with the stages after it.

A run holds its folder's lease (`amber.lease`) from start to end, so two runs of one resource
on one store, or a run and the operator, never write the same folder. Stage processes die
with the run: they get SIGTERM when it ends, however it ends (a parent-death signal), and
its own exits stop their whole process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from amber import errors, history, lease, report, state, worker
from amber.api import AmberCompression, StorageSpec
from amber.plan import (
    StageRun,
    accelerator_env,
    on_this_machine,
    plan,
    run_uri,
    torchrun_args,
)
from amber.publish import publish_final
from amber.records import Event, StageResult, parse_event
from amber.storage import Store, open_store

PARENT_DEATH_ENV = "AMBER_PARENT_DEATH_SIGNAL"  # the trainer asks for SIGTERM on our death
ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Failed|Mismatch|Interrupt)\b.*?: ")


class StageFailed(errors.StageFailed):
    """A stage that ended without committing; `code` is the failure's class when the stage
    said it (a storage or input error exits as one), else StageFailed's."""

    def __init__(self, stage: str, code: int, log: Path, cause: str, kind: int | None = None):
        super().__init__(f"stage {stage} failed (exit {code}): {cause}\n  log: {log}")
        self.stage, self.code_, self.log, self.cause = stage, code, log, cause
        if kind is not None:
            self.code = kind


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Looked up once, here: the child of a fork (preexec_fn) should only make the call.
PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_raise():
    """SIGTERM and SIGHUP raise `errors.Stopped` in `amber run`, as Ctrl-C raises
    KeyboardInterrupt: the stages are stopped, the lease released, one line said (the
    handlers before are put back after)."""

    def stop(signum, frame):
        raise errors.Stopped(signum)

    before = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def stop_signals_exit() -> None:
    """A stage process stopped by SIGTERM or SIGHUP exits through its `finally` blocks
    (its scratch folder removed), with status 128 + signal; nothing is committed."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


def stop_signal(code: int) -> int | None:
    """The stop signal a process's exit status says it ended by (killed by it, or exited
    128 + it as `stop_signals_exit` makes it), or None."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        if code in (-sig, 128 + sig):
            return int(sig)
    return None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies; a no-op elsewhere."""
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def cause(result: StageResult | None, log_text: str, code: int = 1) -> str:
    """What a failed stage said: its result's message, else the last error line of its log
    (a traceback's last line), else what killed it (a signal), else the log's last line that
    is not an event (a progress line says nothing of why)."""
    if result is not None and result.message:
        return result.message
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    found = [line for line in lines if ERROR_LINE.match(line)]
    if not found and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    said = [line for line in lines if parse_event(line) is None]
    return (found or said or ["no output"])[-1][:500]


@dataclass
class StageOutcome:
    stage: str
    type: str
    status: str  # ran | resumed | reused | skipped (not in --stages)
    seconds: float
    output: str
    metrics: dict = field(default_factory=dict)
    resumed_from: int | None = None


# on_event(stage_run, event): progress callbacks for the terminal UI
EventFn = Callable[[StageRun, Event], None]


@dataclass(frozen=True)
class Launched:
    """A stage that ran to success: its result, and the step its first resume started from
    (None: it started afresh)."""

    result: StageResult
    resumed_from: int | None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_processes(run: StageRun) -> int:
    """The resource's process count, capped to this machine (one per GPU, else one)."""
    wanted = run.resources.processes
    try:
        import torch

        available = torch.cuda.device_count()
    except ImportError:
        available = 0
    return max(1, min(wanted, available)) if available else 1


def with_store(obj: AmberCompression, store_uri: str | None) -> AmberCompression:
    if store_uri is None:
        return obj
    spec = obj.spec.model_copy(update={"storage": StorageSpec(uri=store_uri)})
    return obj.model_copy(update={"spec": spec})


def run_folder(obj: AmberCompression) -> Store:
    """The store of the resource's run folder (`spec.storage`, local credentials)."""
    storage = obj.spec.storage
    uri = run_uri(storage.uri, obj.metadata.namespace, obj.metadata.name)
    return open_store(uri, storage.endpoint, storage.region)


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class EventLog(io.TextIOBase):
    """A stage's stdout: every line goes to its log; JSON event lines also to `on_event`,
    and the result and first resume are kept."""

    def __init__(self, log, run: StageRun, on_event: EventFn):
        self.log, self.run, self.on_event = log, run, on_event
        self.result: StageResult | None = None
        self.resumed: int | None = None
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.line(line + "\n")
        return len(text)

    def end(self) -> None:
        """The stream is over: a last line without its newline still counts."""
        if self._partial:
            self.line(self._partial)
            self._partial = ""

    def line(self, line: str) -> None:
        self.log.write(line)
        event = parse_event(line)
        if event is None:
            return
        self.on_event(self.run, event)
        if event.event == "result":
            self.result = StageResult.parse(line)
        elif event.event == "resumed" and self.resumed is None:
            self.resumed = event.get("step")


def _finish(run: StageRun, code: int, events: EventLog, log_path: Path) -> Launched:
    result = events.result
    stopped = stop_signal(code)
    if result is None and stopped is not None:
        raise errors.Stopped(stopped, f"stage {run.stage.name}")
    if code != 0 or result is None or result.status != "Succeeded":
        text = log_path.read_text(errors="replace")
        kind = result.code if result is not None else None
        raise StageFailed(run.stage.name, code, log_path, cause(result, text, code), kind)
    return Launched(result, events.resumed)


def _files(run: StageRun, logs: Path) -> tuple[Path, Path]:
    """A stage's config (written here) and log file, in the run's log folder."""
    config = logs / f"{run.stage.name}.json"
    config.write_text(run.model_dump_json(by_alias=True, indent=2))
    return config, logs / f"{run.stage.name}.log"


def _stage_env(processes: int, fence: dict[str, str]) -> dict[str, str]:
    """The environment of a stage's processes: unbuffered event lines, death with their
    parent, the run lease's `fence` they commit under, and on CPUs DeepSpeed's CPU
    accelerator and the cores shared out."""
    gpu = has_gpu()
    env = {
        **accelerator_env(int(gpu)),
        **os.environ,  # what the user set wins
        "PYTHONUNBUFFERED": "1",
        PARENT_DEATH_ENV: str(int(signal.SIGTERM)),
        **fence,
    }
    if not gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def launch(
    run: StageRun, processes: int, logs: Path, on_event: EventFn, fence: dict[str, str]
) -> Launched:
    """Run one stage as a torchrun gang on this machine."""
    config, log_path = _files(run, logs)
    env = _stage_env(processes, fence)
    # torchrun makes a log folder of its own (in /tmp unless told): in the run's, it goes
    # with the run's when the run succeeds.
    options = [*on_this_machine(free_port()), f"--log-dir={logs / 'torchrun'}"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_args(run.stage.type, str(config), processes, options),
    ]
    with open(log_path, "w") as log:
        events = EventLog(log, run, on_event)
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C here stops the whole gang, not half of it
            preexec_fn=die_with_parent,  # torchrun stops its workers on SIGTERM
        )
        try:
            for line in proc.stdout:
                events.line(line)
            code = proc.wait()
        finally:
            stop_group(proc)  # also after a clean exit: no stray worker keeps writing
    return _finish(run, code, events, log_path)


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group of `proc`, SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        else:
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def launch_here(run: StageRun, logs: Path, on_event: EventFn, fence: dict[str, str]) -> Launched:
    """Run one stage inside this process, as a gang of one, through the same entry point.

    For benchmarks that run dozens of small stages: starting torchrun and importing torch,
    diffusers and DeepSpeed costs about 10 s a stage on two cores, more than a tiny stage
    trains. The process group it joins stays up for the next stage.
    """
    gang = {**worker.GANG, "MASTER_PORT": str(free_port()), **fence}
    gang.update((k, v) for k, v in accelerator_env(int(has_gpu())).items() if k not in os.environ)
    config, log_path = _files(run, logs)
    saved = dict(os.environ)
    os.environ.update(gang)  # only while the stage runs: later subprocesses must not inherit it
    try:
        from amber_trainer import entry

        with open(log_path, "w") as log:
            events = EventLog(log, run, on_event)
            with contextlib.redirect_stdout(events), contextlib.redirect_stderr(events):
                code = entry.main(run.stage.type, config)
            events.end()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return _finish(run, code, events, log_path)


class Worker:
    """`amber run`'s warm worker (`amber.worker`): started when the first single-process
    stage runs, kept for the next ones, stopped with the run however it ends."""

    def __init__(self, logs: Path, fence: dict[str, str]):
        self.logs, self.fence = logs, fence
        self.proc: subprocess.Popen | None = None
        self.busy = False

    def _start(self) -> subprocess.Popen:
        env = {**_stage_env(1, self.fence), **worker.GANG, "MASTER_PORT": str(free_port())}
        # The log folder is in its command line, as in a torchrun stage's (its config path).
        command = [sys.executable, "-m", "amber", "worker", str(self.logs)]
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C reaches `amber run`, which stops the worker
            preexec_fn=die_with_parent,
        )

    def launch(self, run: StageRun, on_event: EventFn) -> Launched:
        """Run one stage in the worker."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        config, log_path = _files(run, self.logs)
        task = worker.Task(stage_type=run.stage.type, config=str(config))
        code = None
        self.busy = True
        with open(log_path, "w") as log:
            events = EventLog(log, run, on_event)
            try:
                self.proc.stdin.write(task.model_dump_json() + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:  # it died idle: its output below says why
                pass
            for line in self.proc.stdout:
                if line.startswith(worker.DONE_PREFIX):
                    code = worker.Done.model_validate_json(line).code
                    self.busy = False
                    break
                events.line(line)
        if code is None:  # the worker died in the stage (killed, out of memory)
            code = self.proc.wait()
            self.close()
        return _finish(run, code, events, log_path)

    def close(self) -> None:
        if self.proc is None:
            return
        if not self.busy:  # end of its input: an idle worker exits by itself
            with contextlib.suppress(BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
        stop_group(self.proc)  # a stage interrupted (Ctrl-C) stops at once
        self.proc, self.busy = None, False


Launcher = Literal["auto", "torchrun", "here"]


class Launch:
    """How a run's stages are started (see `run_resource`), with the run's log folder, its
    warm worker and the environment that hands its stages the lease's fence."""

    def __init__(self, launcher: Launcher, processes: int | None, logs: Path, fence: lease.Fence):
        self.launcher, self.processes, self.logs = launcher, processes, logs
        self.fence = fence.env()
        self.worker = Worker(logs, self.fence)

    def launch(self, run: StageRun, on_event: EventFn) -> Launched:
        if self.launcher == "here":
            return launch_here(run, self.logs, on_event, self.fence)
        processes = self.processes or default_processes(run)
        if self.launcher == "auto" and processes == 1:
            return self.worker.launch(run, on_event)
        return launch(run, processes, self.logs, on_event, self.fence)

    def close(self) -> None:
        self.worker.close()


def run_resource(
    obj: AmberCompression,
    store_uri: str | None = None,
    only: list[str] | None = None,
    from_stage: str | None = None,
    processes: int | None = None,
    on_event: EventFn = lambda run, event: None,
    launcher: Launcher = "auto",
    wait: float = 0.0,
    on_wait=lambda holder: None,
) -> tuple[list[StageOutcome], str | None]:
    """Run (or continue) the pipeline; the outcome of each stage and the final model's URI.
    `launcher` says how a stage runs: "auto" in the warm worker when it has one process, else
    under torchrun; or always "torchrun"; or "here", inside this process (`launch_here`).
    `wait` is how long to wait for another holder of the run's lease (RunLocked after that)."""
    obj = with_store(obj, store_uri)
    runs = plan(obj)
    names = [r.stage.name for r in runs]
    for name in [*(only or []), *([from_stage] if from_stage else [])]:
        if name not in names:
            raise errors.InvalidInput(f"no stage named {name!r} (stages: {', '.join(names)})")
    store = run_folder(obj)
    with lease.acquire(store, "amber-run", wait=wait, on_wait=on_wait).keep() as held:
        logs = Path(tempfile.mkdtemp(prefix=f"amber-run-{obj.metadata.name}-"))
        how = Launch(launcher, processes, logs, held.fence)
        try:
            result = _run_held(obj, runs, store, held, only, from_stage, how, on_event)
        except (KeyboardInterrupt, errors.Stopped):
            how.close()
            shutil.rmtree(logs, ignore_errors=True)  # stopped on purpose: nothing to read
            raise
        finally:
            how.close()
        # Kept when the run failed: the error names a stage's log in it.
        shutil.rmtree(logs, ignore_errors=True)
        return result


def _run_held(
    obj: AmberCompression,
    runs: list[StageRun],
    store: Store,
    held: lease.Lease,
    only: list[str] | None,
    from_stage: str | None,
    how: Launch,
    on_event: EventFn,
) -> tuple[list[StageOutcome], str | None]:
    """`run_resource`'s work, under the run's lease (checked before every stage)."""
    names = [r.stage.name for r in runs]
    forced = set(names[names.index(from_stage) :]) if from_stage else set()

    outcomes = []
    for run in runs:
        held.check()
        name = run.stage.name

        def note(message: str, run: StageRun = run) -> None:
            on_event(run, Event(event="warning", stage=run.stage.name, message=message))

        found = state.read(store, run, note, detail=False)
        output = found.output
        if found.committed and name not in forced:
            outcomes.append(
                StageOutcome(
                    name,
                    run.stage.type,
                    "reused",
                    0.0,
                    f"{store.uri}/{output.folder}",
                    output.metrics,
                )
            )
            history.record(store, {"stage": name, "status": "reused"})
            on_event(run, Event(event="reused", stage=name))
            continue
        if only and name not in only:
            outcomes.append(StageOutcome(name, run.stage.type, "skipped", 0.0, ""))
            continue
        if name in forced:
            store.delete(name)  # a re-run asked for; the trainer removes what is stale
        started = time.perf_counter()
        launched = how.launch(run, on_event)
        result, resumed = launched.result, launched.resumed_from
        status = "ran" if resumed is None else "resumed"
        seconds = time.perf_counter() - started
        outcomes.append(
            StageOutcome(
                name, run.stage.type, status, seconds, result.output or "", result.metrics, resumed
            )
        )
        history.record(
            store, {"stage": name, "status": status, "resumedFrom": resumed, "seconds": seconds}
        )
    held.check()
    produces_model = any(r.stage.makes_model for r in runs)
    publish = produces_model and not only
    final = publish_final(obj, runs, store, fence=held.fence) if publish else None
    report.write(obj, runs, store)
    return outcomes, f"{store.uri}/{final.folder}" if final is not None else None


def outcome_dicts(outcomes: list[StageOutcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]
