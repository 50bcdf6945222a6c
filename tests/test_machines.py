"""Ordinary machines that are hostile to a run: a store behind a symlink, a full or read-only
disk, permissions, a symlink loop, a name too long, a teacher whose weights disagree with its
config, damaged shards and history, checksums that fail, stop signals.

Everything here is real: symlinks, tmpfs mounts in a mount namespace of their own (`unshare
-m`, so nothing outlives the test), a root process without CAP_DAC_OVERRIDE (`setpriv`) for
"permission denied", the loopback S3 behind a proxy that damages bodies. The contract each
checks: one line naming the path and the cause, the class's exit status, never "internal
error", never a traceback, never a wrong model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_hostile import cli

from amber import history, lease, local
from amber.errors import InvalidInput, StorageError
from amber.storage import LocalStore, open_store

ROOT = Path(__file__).parent.parent
RANDOM = ROOT / "manifests" / "examples" / "amber-random.yaml"
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and capabilities need root")


def resource(tmp_path: Path, **spec) -> Path:
    doc = yaml.safe_load(RANDOM.read_text())
    doc["spec"].update(spec)
    path = tmp_path / "amber-random.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def one_clear_line(output: str) -> None:
    assert "Traceback" not in output and "internal error" not in output, output


# --- the store's path --------------------------------------------------------------------


def test_a_store_behind_a_symlink_runs_and_names_the_path_as_given(tmp_path):
    (tmp_path / "disk1").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "disk1")
    store = LocalStore(tmp_path / "data" / "store")
    store.write_text("score/output/importance.json", "{}")
    assert store.list("score") == {"score/output/importance.json": 2}
    assert store.download_prefix("score", tmp_path / "copy") == [
        tmp_path / "copy" / "score/output/importance.json"
    ]
    assert str(store.local_path("score/output/importance.json")).startswith(str(tmp_path / "data"))
    # The two stages whose hand-over failed: score's output read back by prune.
    out = cli(
        "run", resource(tmp_path), "--store", tmp_path / "data" / "st", "--stages", "score,prune"
    )
    assert out.exit_code == 0, out.output
    assert (tmp_path / "disk1" / "st" / "default" / "amber-random" / "prune" / "output").is_dir()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "gone").symlink_to(d / "nowhere"), "is a symlink to"),
        (lambda d: (d / "gone").symlink_to(d / "gone"), "symlink loop"),
        (lambda d: None, "File name too long"),
    ],
    ids=["dangling", "loop", "name-too-long"],
)
def test_a_broken_store_path_is_refused_at_once_in_one_line(tmp_path, make, message):
    make(tmp_path)
    store = tmp_path / ("gone" if message != "File name too long" else "n" * 300) / "store"
    started = time.monotonic()
    out = cli("run", resource(tmp_path), "--store", store)
    assert out.exit_code == 3, out.output
    assert message in out.output and str(tmp_path) in out.output
    one_clear_line(out.output)
    assert time.monotonic() - started < 10  # before any stage starts


def test_a_file_uri_is_percent_decoded(tmp_path):
    store = open_store(f"file://{tmp_path}/st%20ore")
    store.write_text("a.json", "{}")
    assert (tmp_path / "st ore" / "a.json").is_file()
    assert not (tmp_path / "st%20ore").exists()
    with pytest.raises(StorageError, match="names no host"):
        open_store("file://elsewhere/runs")


# --- the machine refusing a write --------------------------------------------------------


def _in_mount_namespace(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """`script` (bash) in a mount namespace of its own: its tmpfs mounts vanish with it."""
    env = {**os.environ, "AMBER": f"{sys.executable} -m amber"}
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@AS_ROOT
def test_a_full_or_read_only_disk_is_one_storage_line_and_publishes_nothing(tmp_path):
    """One tmpfs: a run's stages fill it, then the disk is filled to leave room for the lease
    and the history but not the final model, then to the last byte, then remounted
    read-only. Each run after exits 3 naming the file and the cause."""
    spec = resource(tmp_path)
    script = f"""
    mkdir disk && mount -t tmpfs -o size=16m tmpfs disk
    $AMBER run {spec} --store disk/st --stages score,prune,finetune,fuse,eval -o json > first.json
    # Leave 64 KiB: the lease and the history fit, the final model (about 1 MB) does not.
    free=$(( $(stat -f -c '%a*%S' disk | bc) - 65536 ))
    head -c $free /dev/zero > disk/filler 2>/dev/null || true
    set +e
    $AMBER run {spec} --store disk/st > publish.out 2> publish.err; echo $? > publish.code
    cat /dev/zero > disk/filler2 2>/dev/null
    rm -f disk/st/default/amber-random/LEASE.json
    $AMBER run {spec} --store disk/st > full.out 2> full.err; echo $? > full.code
    rm -f disk/filler disk/filler2
    mount -o remount,ro disk
    $AMBER run {spec} --store disk/st > ro.out 2> ro.err; echo $? > ro.code
    ls -R disk/st/default/amber-random > listing.txt
    # An empty store on a read-only disk, and a disk turned read-only mid-run.
    mkdir empty && mount -t tmpfs -o size=1m,ro tmpfs empty
    $AMBER run {spec} --store empty/st > empty.out 2> empty.err; echo $? > empty.code
    mkdir midway && mount -t tmpfs -o size=16m tmpfs midway
    $AMBER run {spec} --store midway/st > midway.out 2> midway.err &
    until [ -e midway/st/default/amber-random/score/output/COMMIT.json ]; do sleep 0.2; done
    mount -o remount,ro midway
    wait $!; echo $? > midway.code
    """
    done = _in_mount_namespace(tmp_path, script)
    assert done.returncode == 0, done.stdout + done.stderr
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    for case, cause in (
        ("publish", "No space left on device"),
        ("full", "No space left on device"),
        ("ro", "Read-only file system"),
        ("empty", "Read-only file system"),
        ("midway", "Read-only file system"),
    ):
        assert read(f"{case}.code").strip() == "3", (case, read(f"{case}.err"))
        assert cause in read(f"{case}.err") and "/st" in read(f"{case}.err"), case
        one_clear_line(read(f"{case}.err"))
    assert "final" in read("publish.err")
    assert "LEASE.json" in read("full.err") or "history.jsonl" in read("full.err")
    assert "/final:" not in read("listing.txt")  # no half-copied model left behind


@AS_ROOT
def test_permission_denied_is_one_storage_line(tmp_path):
    """A root process without CAP_DAC_OVERRIDE is refused by a folder's mode bits, as any
    user's is."""
    store = tmp_path / "store"
    (store / "default").mkdir(parents=True)
    (store / "default").chmod(0o555)
    done = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search",
            sys.executable,
            "-m",
            "amber",
            "run",
            str(resource(tmp_path)),
            "--store",
            str(store),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "Permission denied" in done.stderr and str(store) in done.stderr
    one_clear_line(done.stderr)


# --- what the stages read ----------------------------------------------------------------


def _teacher_folder(tmp_path: Path, layers: int) -> Path:
    from amber_trainer.model import models

    config = {**models.TINY, "num_layers": layers}
    folder = tmp_path / f"teacher-{layers}"
    models.build(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("weights", "says"), [(4, 6), (6, 4), (6, 5)])
def test_a_teacher_whose_weights_disagree_with_its_config_is_refused(tmp_path, weights, says):
    from amber_trainer.model import models

    folder = _teacher_folder(tmp_path, weights)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": says}))
    with pytest.raises(InvalidInput) as caught:
        models.load(folder)
    message = str(caught.value)
    assert str(folder / "diffusion_pytorch_model.safetensors") in message
    assert f"num_layers {says}" in message
    assert ("missing" in message) == (says > weights)
    assert ("unexpected" in message) == (says < weights)
    assert "transformer_blocks." in message


def test_a_run_on_a_mismatched_teacher_stops_and_commits_nothing(tmp_path):
    folder = _teacher_folder(tmp_path, 6)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 5}))
    doc = yaml.safe_load(RANDOM.read_text())
    doc["spec"]["teacher"] = {"uri": str(folder)}
    doc["spec"]["overrides"] = {"score": {"calibrationSamples": 8, "timesteps": [0.5]}}
    spec = tmp_path / "mismatched.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = cli("run", spec, "--store", tmp_path / "store", "--stages", "score")
    assert out.exit_code == 2, out.output
    assert "the weights do not match" in out.output and "unexpected" in out.output
    one_clear_line(out.output)
    run = LocalStore(tmp_path / "store" / "default" / "amber-random")
    assert not [key for key in run.list() if key.endswith("COMMIT.json")]


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_a_damaged_data_shard_is_named(tmp_path, damage):
    from safetensors.torch import save_file

    from amber_trainer import data

    good = tmp_path / "shard-00000.safetensors"
    tensors = {
        "latents": torch.zeros(2, 4, 16),
        "text": torch.zeros(2, 3, 8),
        "text_mask": torch.ones(2, 3),
        "side": torch.tensor(4),
    }
    save_file(tensors, good)
    bad = tmp_path / "shard-00001.safetensors"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        save_file({"weights": torch.zeros(2)}, bad)
    with pytest.raises(StorageError, match=f"data shard {bad}"):
        data.load_shards([good, bad])


def test_a_damaged_history_is_a_record_not_an_input(tmp_path):
    store = LocalStore(tmp_path / "run")
    history.record(store, {"stage": "score", "status": "ran"})
    text = store.read_text(history.KEY)
    store.write_text(history.KEY, text + text[: len(text) // 2])  # a write cut short
    with pytest.warns(UserWarning, match="1 damaged line"):
        assert [e["stage"] for e in history.entries(store)] == ["score"]
    history.record(store, {"stage": "prune", "status": "ran"})
    with pytest.warns(UserWarning, match="1 damaged line"):
        assert [e["stage"] for e in history.entries(store)] == ["score", "prune"]


# --- S3 bodies that fail their checksum --------------------------------------------------


def test_s3_bodies_that_fail_their_checksum_are_read_again_then_named(
    bucket, cutting, monkeypatch, tmp_path
):
    payload = bytes(range(256)) * 64
    open_store(f"s3://{bucket}/runs").write_bytes("x/weights.bin", payload)
    for read in ("read_bytes", "download", "sha256"):
        proxy = cutting(2, damage="flip")
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = open_store(f"s3://{bucket}/runs")
        if read == "read_bytes":
            assert store.read_bytes("x/weights.bin") == payload
        elif read == "download":
            store.download("x/weights.bin", tmp_path / "w.bin")
            assert (tmp_path / "w.bin").read_bytes() == payload
        else:
            import hashlib

            assert store.sha256("x/weights.bin") == hashlib.sha256(payload).hexdigest()
        assert proxy.cut == 2, read
        proxy = cutting(100, damage="flip")
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = open_store(f"s3://{bucket}/runs")
        with pytest.raises(StorageError, match=rf"s3://{bucket}/runs/x/weights.bin: body"):
            getattr(store, read)(
                *(
                    ["x/weights.bin", tmp_path / "w2.bin"]
                    if read == "download"
                    else ["x/weights.bin"]
                )
            )


# --- stop signals ------------------------------------------------------------------------


def _run_with_a_busy_worker(tmp_path: Path, store: Path):
    """`amber run` of the random example with its warm worker in a stage; the run's
    process and every process below it."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "amber", "run", str(resource(tmp_path)), "--store", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path / "scratch")},
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "scratch").glob("amber-score-*")):  # the stage's scratch
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]


@pytest.mark.parametrize(
    ("target", "sig"), [("run", "SIGTERM"), ("run", "SIGHUP"), ("worker", "SIGTERM")]
)
def test_a_stop_signal_stops_cleanly_releases_the_lease_and_says_so(tmp_path, target, sig):
    import psutil

    (tmp_path / "scratch").mkdir()
    store = tmp_path / "store"
    proc, family = _run_with_a_busy_worker(tmp_path, store)
    signum = getattr(signal, sig)
    if target == "run":
        proc.send_signal(signum)
    else:
        (worker,) = [p for p in psutil.Process(proc.pid).children() if "worker" in p.cmdline()]
        worker.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    what = "the run" if target == "run" else "stage score"
    assert f"{what} stopped by {sig}: run the same command again to continue" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    one_clear_line(err)
    assert lease.read(LocalStore(store / "default" / "amber-random"))[0].released
    assert [p.name for p in (tmp_path / "scratch").glob("amber-*")] == []  # scratch, logs
    assert not [pid for pid in family if psutil.pid_exists(pid)]


def test_a_stage_killed_says_by_what_never_a_progress_line():
    progress = '{"event": "progress", "stage": "finetune", "step": 3, "total": 80}\n'
    assert local.cause(None, progress, -signal.SIGKILL) == "killed by SIGKILL"
    assert local.cause(None, "loading\n" + progress, 1) == "loading"
    assert local.cause(None, progress + "RuntimeError: out of memory\n", -9).startswith("Runtime")


def test_stop_signals_are_the_same_handler_as_the_exit_codes_listed():
    assert local.stop_signal(128 + signal.SIGTERM) == signal.SIGTERM
    assert local.stop_signal(-signal.SIGHUP) == signal.SIGHUP
    assert local.stop_signal(1) is None and local.stop_signal(-signal.SIGKILL) is None


# --- the lease: clocks, PID namespaces, a holder that lost it ---------------------------

TAKER = """
import sys, time
real = time.time
time.time = lambda: real() + float(sys.argv[2])  # this process's clock, skewed
from amber import lease
from amber.errors import RunLocked
from amber.storage import open_store
try:
    lease.acquire(open_store(sys.argv[1]), "amber-run", wait=float(sys.argv[3])).release()
    print("took it over")
except RunLocked as err:
    print("refused:", err)
"""


def test_a_clock_ahead_never_takes_over_a_live_lease(tmp_path):
    """A second process whose clock is 120 s ahead sees the live holder's lease as expired;
    it watches it for the holder's ttl on its own clock, sees it renewed, and is refused."""
    store = LocalStore(tmp_path / "run")

    def taker_ahead() -> str:
        out = subprocess.run(
            [sys.executable, "-c", TAKER, str(store.root), "120", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout + out.stderr

    with lease.acquire(store, "amber-run", ttl=1.0).keep():
        said = taker_ahead()
        assert said.startswith("refused: "), said
        assert lease.read(store)[0].kind == "amber-run" and not lease.read(store)[0].released
    # A holder that died without a word (the same lease left unrenewed) is taken over by
    # the skewed process after one ttl of watching.
    held = lease.acquire(store, "amber-run", ttl=1.0)  # never renewed nor released
    said = taker_ahead()
    assert said.startswith("took it over"), said
    assert not held.renew()


@AS_ROOT
def test_a_holder_in_another_pid_namespace_is_not_taken_for_dead(tmp_path):
    """The same host name, another PID namespace: the holder's pid is not in its process
    table, and that says nothing (a container beside the holder's)."""
    spec = resource(tmp_path)
    store = tmp_path / "store"
    with lease.acquire(LocalStore(store / "default" / "amber-random"), "amber-run").keep():
        in_new_namespace = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable]
        done = subprocess.run(
            [*in_new_namespace, "-m", "amber", "run", str(spec), "--store", str(store)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 5, done.stderr
    assert f"being run by amber-run pid {os.getpid()}" in done.stderr


def test_a_holder_paused_past_its_lease_never_commits_over_the_new_holder(tmp_path):
    """Run A is stopped (SIGSTOP, every process of it) in its finetune past its lease's ttl;
    run B watches the lease unchanged for a ttl, takes it over and runs; A is resumed and
    goes on training, but its next commit is refused (the lease names B): A exits 5, B
    finishes, and every marker written after the pause is B's."""
    import psutil

    doc = yaml.safe_load(RANDOM.read_text())
    # Small stages: B runs the rest of the pipeline while the suite's other worker is busy.
    overrides = doc["spec"]["overrides"]
    overrides["finetune"].update(steps=40, checkpointEvery=10)
    overrides["fuse"].update(steps=4, finetuneSteps=4, checkpointEvery=4)
    overrides["eval"].update(samples=4)
    spec = tmp_path / "paused.yaml"
    spec.write_text(yaml.safe_dump(doc))
    store = tmp_path / "store"
    env = {**os.environ, lease.TTL_ENV: "2"}
    command = [sys.executable, "-m", "amber", "run", str(spec), "--store", str(store)]
    run_a = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    folder = LocalStore(store / "default" / "amber-random")
    deadline = time.monotonic() + 300
    while not folder.exists("finetune/progress.json"):
        assert run_a.poll() is None and time.monotonic() < deadline, run_a.communicate()
        time.sleep(0.2)
    family = [psutil.Process(run_a.pid), *psutil.Process(run_a.pid).children(recursive=True)]
    for process in family:
        process.suspend()
    paused = time.time()
    token_a = lease.read(folder)[0].token
    run_b = subprocess.Popen(
        [*command, "--wait", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    while lease.read(folder)[0].token == token_a:
        assert run_b.poll() is None and time.monotonic() < deadline, run_b.communicate()
        time.sleep(0.1)
    for process in family:
        process.resume()
    _, err_a = run_a.communicate(timeout=600)
    _, err_b = run_b.communicate(timeout=600)
    assert run_b.returncode == 0, err_b
    assert run_a.returncode == 5, err_a
    assert "no longer names the run" in err_a or "was taken over" in err_a, err_a
    one_clear_line(err_a)
    markers = [k for k in folder.list() if k.endswith("COMMIT.json")]
    assert any(k.startswith("final/") for k in markers)
    for key in markers:
        manifest = json.loads(folder.read_text(key))
        assert manifest["fence"] == token_a + 1 or manifest["created"] < paused, key
