"""Hostile input and damaged storage: a clear error with its class's exit code, never a
traceback, never a write to the store for refused input; damaged commits quarantined and
fallen back from; one holder per run folder.

The CLI cases run in-process (typer's runner, the same `Commands` error path a shell sees);
one case per class also runs as a real subprocess. S3 faults come from a proxy of our own
on loopback between boto3 and the moto server (tests/s3_proxy.py, the `cutting` fixture):
it cuts response bodies short.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import amber
from typer.testing import CliRunner

from amber import commits, lease
from amber.cli import app
from amber.errors import CorruptCommit, RunLocked, StorageError
from amber.storage import LocalStore, open_store

ROOT = Path(__file__).parent.parent
TINY = ROOT / "manifests" / "examples" / "amber-random.yaml"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tiny(**spec) -> dict:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"].update(spec)
    return doc


def metadata(**changes) -> dict:
    doc = tiny()
    doc["metadata"].update(changes)
    return doc


def stage_named(name: str) -> dict:
    """The random example with its stages written out, the score stage named `name`."""
    doc = tiny(preset=None, overrides={})
    del doc["spec"]["preset"], doc["spec"]["overrides"]
    doc["spec"]["stages"] = [
        {"type": "score", "name": name, "targetLayers": 6, "timesteps": [0.5]},
        {"type": "prune"},
    ]
    return doc


def teacher_config(**changes) -> dict:
    doc = tiny()
    doc["spec"]["teacher"]["config"].update(changes)
    return doc


BOMB = """apiVersion: amber.dev/v1alpha1
kind: AmberCompression
metadata: {name: bomb}
spec:
  teacher:
    config:
      a: &a [x, x, x, x, x, x, x, x, x]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  storage: {uri: ./s}
  data: {synthetic: {}}
  preset: amber-6b
"""

REFUSED = {
    "layers as a list": (teacher_config(num_layers=[12]), "spec.teacher.config.num_layers"),
    "layers null": (teacher_config(num_layers=None), "spec.teacher.config.num_layers"),
    "layers 12.7": (teacher_config(num_layers=12.7), "spec.teacher.config.num_layers"),
    "layers 'two'": (teacher_config(num_layers="two"), "spec.teacher.config.num_layers"),
    "layers -2": (teacher_config(num_layers=-2), "spec.teacher.config.num_layers"),
    "unknown config key": (teacher_config(num_layer=12), "spec.teacher.config.num_layer"),
    "rope not the head width": (
        teacher_config(axes_dims_rope=[4, 4, 4]),
        "axes_dims_rope: [4, 4, 4] sums to 12, not attention_head_dim (16)",
    ),
    "channels that do not pack": (teacher_config(in_channels=12), "spec.teacher.config"),
    "credentials in storage.uri": (
        tiny(storage={"uri": "s3://AKIA:secret@bucket/runs"}),
        "spec.storage.uri",
    ),
    "credentials in endpoint": (
        tiny(storage={"uri": "s3://b/r", "endpoint": "http://u:p@127.0.0.1:9000"}),
        "spec.storage.endpoint: credentials in a URL are refused",
    ),
    "s3 without a bucket": (tiny(storage={"uri": "s3:///runs"}), "names no bucket"),
    "alias bomb": (BOMB, "more than 16 YAML aliases"),
    "duplicate keys": (
        TINY.read_text().replace("  preset: amber-6b", "  preset: amber-6b\n  preset: amber-10b"),
        "duplicate key 'preset'",
    ),
    "deep nesting": ("spec: " + "[" * 3000 + "]" * 3000, "nested deeper than 32"),
    "a stage named final": (stage_named("final"), "spec.stages[0].name: 'final' is reserved"),
    "a stage named quarantine": (stage_named("quarantine"), "'quarantine' is reserved"),
    "a namespace of 64 characters": (metadata(namespace="n" * 64), "metadata.namespace"),
    "a label key with a space": (metadata(labels={"team a": "x"}), "metadata.labels: key 'team a'"),
    "a label value too long": (metadata(labels={"team": "v" * 64}), "metadata.labels: value"),
    "a label key prefix not a DNS name": (
        metadata(labels={"Example.COM/team": "a"}),
        "its prefix must be a DNS subdomain",
    ),
    "annotations over 256 KiB": (
        metadata(annotations={"note": "x" * (256 * 1024)}),
        "metadata.annotations: 262148 bytes in all, over the 262144 Kubernetes allows",
    ),
    "binary garbage": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage", "not UTF-8 text"),
    "a huge file": ("# " + "x" * (2 << 20), "larger than 1024 KiB"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_resources_are_refused_naming_the_field_and_write_nothing(tmp_path, case):
    content, message = REFUSED[case]
    path = tmp_path / "bad.yaml"
    if isinstance(content, dict):
        content = yaml.safe_dump(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    store = tmp_path / "store"
    for command in (["validate", path], ["run", path, "--store", store]):
        out = cli(*command)
        assert out.exit_code == 2, (case, out.output)
        assert message in out.output, (case, out.output)
        assert "Traceback" not in out.output and "internal error" not in out.output
    assert not store.exists()


def test_thousands_of_problems_print_a_screenful(tmp_path):
    doc = tiny()
    doc["spec"]["overrides"]["finetune"].update({f"unknown{i}": i for i in range(5000)})
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = cli("validate", path)
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert 20 <= len(lines) <= 23, len(lines)
    assert lines[-1].strip() == "and 4980 more", lines[-3:]


@pytest.mark.parametrize(
    ("store", "code", "message"),
    [
        ("s3://", 2, "--store: "),
        ("s3:///prefix", 2, "names no bucket"),
        ("s3://key:secret@bucket/x", 2, "credentials in a URI are refused"),
        ("gs://bucket/x", 2, "only s3://, file:// and plain paths"),
        ("FILE", 3, "is a file, not a folder"),
    ],
)
def test_bad_store_options_are_clear_errors(tmp_path, store, code, message):
    resource = tmp_path / "tiny.yaml"
    resource.write_text(TINY.read_text())
    if store == "FILE":
        store = tmp_path / "a-file"
        store.write_text("not a folder")
    out = cli("run", resource, "--store", store)
    assert out.exit_code == code, out.output
    assert message in out.output and "Traceback" not in out.output
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()


def test_the_real_command_prints_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    out = amber("run", str(path), "--store", str(tmp_path / "store"))
    assert out.returncode == 2, out.stderr
    assert "not UTF-8 text" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "store").exists()


def _mutate(text: str, draw) -> str:
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "repeat", "value", "indent", "bytes"]))
        if action == "drop":
            del lines[i]
        elif action == "repeat":
            lines.insert(i, lines[i])
        elif action == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            value = draw(
                st.sampled_from(
                    ["null", "[]", "{}", "-1", "1e309", "'x'", "[1, [2]]", "*a", "&a 3", "~"]
                )
            )
            lines[i] = f"{key}: {value}"
        elif action == "indent":
            lines[i] = " " * draw(st.integers(0, 7)) + lines[i].lstrip()
        elif action == "bytes" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = (
                lines[i][:j]
                + draw(st.sampled_from(["\t", "%", "!", "&", "*", "|"]))
                + (lines[i][j + 1 :])
            )
        if not lines:
            lines = [""]
    return "\n".join(lines) + "\n"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_mutations_of_the_examples_never_trace_back_or_write(tmp_path, data):
    example = data.draw(st.sampled_from(sorted((ROOT / "manifests" / "examples").glob("*.yaml"))))
    text = _mutate(example.read_text(), data.draw)
    path = tmp_path / "mutated.yaml"
    path.write_text(text)
    out = cli("validate", path)
    assert out.exit_code in (0, 2), out.output
    assert "internal error" not in out.output and "Traceback" not in out.output
    if out.exit_code == 2:
        store = tmp_path / "store"
        refused = cli("run", path, "--store", store)
        assert refused.exit_code == 2, refused.output
        assert not store.exists()


# --- the store: permissions, faults, damaged commits --------------------------------------


def test_store_files_are_readable_by_the_team(tmp_path):
    old = os.umask(0o022)
    try:
        store = LocalStore(tmp_path / "store")
        store.write_text("a/b.json", "{}")
        mode = stat.S_IMODE((tmp_path / "store" / "a" / "b.json").stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o644


def test_s3_bodies_cut_off_are_read_again_and_named_when_they_never_arrive(
    bucket, cutting, monkeypatch
):
    marker = b'{"step": 3, "files": {}}' * 50
    open_store(f"s3://{bucket}/runs").write_bytes("x/COMMIT.json", marker)
    proxy = cutting(cuts=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    store = open_store(f"s3://{bucket}/runs")
    assert store.read_bytes("x/COMMIT.json") == marker  # two cuts, then the whole body
    assert proxy.cut == 2
    proxy = cutting(cuts=100)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    store = open_store(f"s3://{bucket}/runs")
    with pytest.raises(StorageError, match=rf"reading s3://{bucket}/runs/x/COMMIT.json: body"):
        store.read_bytes("x/COMMIT.json")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(f"s3://{request.getfixturevalue('bucket')}/runs")


def _checkpoint(store, tmp_path, step: int, payload: bytes):
    folder = tmp_path / f"ck-{step}"
    folder.mkdir()
    (folder / "state.bin").write_bytes(payload)
    return commits.commit(store, f"distill/{commits.checkpoint_folder(step)}", folder, step)


def test_a_damaged_newest_checkpoint_is_quarantined_and_the_older_one_used(store, tmp_path):
    _checkpoint(store, tmp_path, 10, b"ten" * 100)
    newest = _checkpoint(store, tmp_path, 20, b"twenty" * 100)
    notes = []
    # A marker cut short: quarantined (with its text kept), the older checkpoint is next.
    marker = f"{newest.folder}/{commits.MARKER}"
    text = store.read_text(marker)
    store.write_text(marker, text[: len(text) // 2])
    found = commits.latest_checkpoint(store, "distill", log=notes.append)
    assert found.step == 10
    assert "is damaged" in notes[0] and newest.folder in notes[0]
    kept = [k for k in store.list(commits.QUARANTINE) if k.endswith(commits.MARKER)]
    assert len(kept) == 1 and store.read_text(kept[0]) == text[: len(text) // 2]
    assert commits.latest_checkpoint(store, "distill", log=notes.append).step == 10
    assert len(notes) == 1  # quarantined once: the folder is a partial write now

    # A file of another size: refused without a download.
    again = _checkpoint(store, tmp_path, 30, b"thirty" * 100)
    store.write_bytes(f"{again.folder}/state.bin", b"short")
    assert commits.latest_checkpoint(store, "distill", log=notes.append).step == 10
    assert "state.bin has 5 bytes, the marker says 600" in notes[-1]

    # Same size, other bytes: the checksum at download says so, naming the file.
    older = commits.latest_checkpoint(store, "distill", log=notes.append)
    store.write_bytes(f"{older.folder}/state.bin", b"TEN" * 100)
    with pytest.raises(CorruptCommit, match=r"state\.bin: checksum mismatch"):
        commits.fetch(store, older, tmp_path / "fetched")


def test_a_damaged_output_is_quarantined_so_its_stage_runs_again(store, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights" * 100)
    commits.commit(store, "prune/output", folder, 1)
    notes = []
    assert commits.read_output(store, "prune/output", notes.append) is not None
    store.delete("prune/output/model.bin")
    assert commits.read_output(store, "prune/output", notes.append) is None
    assert "model.bin is missing" in notes[0]
    assert commits.read_manifest(store, "prune/output") is None
    reasons = [k for k in store.list(commits.QUARANTINE) if k.endswith("REASON.json")]
    assert len(reasons) == 1


def test_same_size_damage_of_a_local_output_is_found_before_reuse(tmp_path):
    store = open_store(str(tmp_path / "store"))
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights" * 100)
    commits.commit(store, "prune/output", folder, 1)
    (tmp_path / "store" / "prune" / "output" / "model.bin").write_bytes(b"WEIGHTS" * 100)
    notes = []
    assert commits.read_output(store, "prune/output", notes.append) is None
    assert "model.bin: checksum mismatch" in notes[0]


# --- the run lease ------------------------------------------------------------------------


def test_one_holder_at_a_time_and_a_dead_holder_is_taken_over(store):
    first = lease.acquire(store, "amber-run")
    with pytest.raises(RunLocked, match=rf"being run by amber-run pid {os.getpid()} on "):
        lease.acquire(store, "amber-run")
    assert first.renew()
    first.release()
    assert lease.read(store)[0].released  # the file stays, so its fencing token counts on
    second = lease.acquire(store, "operator", ttl=0.5)  # released: free again
    assert second.holder.token == first.holder.token + 1
    # A holder that stopped renewing is taken over once this process has seen its lease
    # unchanged for its whole ttl, on its own clock; and the holder finds out.
    time.sleep(0.6)
    started = time.monotonic()
    third = lease.acquire(store, "amber-run")
    assert time.monotonic() - started >= 0.5
    assert third.holder.token == second.holder.token + 1
    assert not second.renew()
    with pytest.raises(RunLocked, match="taken over"):
        second.check()
    second.release()  # never deletes another holder's lease
    assert lease.read(store)[0].id == third.holder.id
    third.release()
    # A holder on this host, in this PID namespace, whose process is gone is stale at once;
    # in another PID namespace the same pid says nothing.
    released, version = lease.read(store)
    dead = released.model_copy(
        update={"pid": 2**22 + 1, "expires": time.time() + 600, "released": False}
    )
    assert store.replace(lease.KEY, dead.model_dump_json().encode(), version)
    lease.acquire(store, "amber-run").release()
    released, version = lease.read(store)
    elsewhere = dead.model_copy(update={"pid_namespace": "pid:[1]", "token": released.token})
    assert store.replace(lease.KEY, elsewhere.model_dump_json().encode(), version)
    with pytest.raises(RunLocked, match="being run by"):
        lease.acquire(store, "amber-run")


def test_the_operators_hold_writes_only_when_a_third_of_its_ttl_has_passed(store):
    assert lease.hold(store, "operator/ns/r", "operator", ttl=0.6) is None
    first, _ = lease.read(store)
    assert lease.hold(store, "operator/ns/r", "operator", ttl=0.6) is None  # a burst of passes
    assert lease.read(store)[0] == first  # not written again
    time.sleep(0.25)  # past a third of the ttl: renewed, same holder, same acquisition
    assert lease.hold(store, "operator/ns/r", "operator", ttl=0.6) is None
    renewed, _ = lease.read(store)
    assert renewed.expires > first.expires and renewed.acquired == first.acquired
    # Another holder is refused while this one lives.
    assert lease.hold(store, "operator/ns/other", "operator", ttl=0.6).id == "operator/ns/r"


def test_racing_for_a_free_lease_has_one_winner(store):
    won, lost = [], []
    start = threading.Barrier(6)

    def race():
        start.wait()
        try:
            won.append(lease.acquire(store, "amber-run"))
        except RunLocked:
            lost.append(1)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(lost)) == (1, 5)
    won[0].release()


def test_a_second_run_of_the_same_folder_is_refused_naming_the_holder(tmp_path):
    store_dir = tmp_path / "store"
    resource = tmp_path / "tiny.yaml"
    resource.write_text(TINY.read_text())
    run_store = open_store(str(store_dir / "default" / "amber-random"))
    held = lease.acquire(run_store, "operator")
    try:
        out = cli("run", resource, "--store", store_dir)
        assert out.exit_code == 5, out.output
        assert f"being run by operator pid {os.getpid()}" in out.output
        assert sorted(p.name for p in run_store.root.iterdir()) == [
            ".LEASE.json.lock",
            "LEASE.json",
        ]
    finally:
        held.release()


# --- whole runs: processes die with `amber run`, damage costs a re-run, not the run -------


def _stage_processes(marker: str) -> list[int]:
    """Pids whose command line holds `marker` (the run's log folder is in every stage's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_killed_run_leaves_no_stage_process_and_damage_is_recovered(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    from trainer_helpers import stage_of, tiny_resource, trainer_env

    store_dir = tmp_path / "store"
    name = f"hostile-{os.getpid()}"
    doc = tiny_resource(str(store_dir), name=name)
    stage_of(doc, "distill").update(steps=60, checkpointEvery=5)
    resource = tmp_path / "run.yaml"
    resource.write_text(yaml.safe_dump(doc))
    run_store = open_store(str(store_dir / "default" / name))

    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "amber", "run", str(resource), "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=trainer_env(),
            start_new_session=True,
        )

    proc = start()
    deadline = time.monotonic() + 400
    while len(list(commits.checkpoints(run_store, "distill"))) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    marker = f"amber-run-{name}-"
    assert _stage_processes(marker), "the distill stage should be running"
    os.killpg(proc.pid, signal.SIGKILL)  # amber run's own group: torchrun is in another
    proc.wait()
    deadline = time.monotonic() + 60
    while _stage_processes(marker):
        assert time.monotonic() < deadline, "stage processes outlived amber run"
        time.sleep(0.5)

    # The killed run's lease is stale (its pid is gone): the next run takes it over. Its
    # newest checkpoint is damaged (same size, other bytes): quarantined, the older used.
    newest, older = list(commits.checkpoints(run_store, "distill"))[:2]
    victim = max(newest.files, key=lambda f: newest.files[f].size)
    path = run_store.local_path(f"{newest.folder}/{victim}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    stages = {s["stage"]: s for s in json.loads(out)["stages"]}
    assert stages["distill"]["status"] == "resumed"
    assert stages["distill"]["resumed_from"] == older.step
    assert "checksum mismatch" in err and "quarantined" in err
    assert any(k.startswith(f"{commits.QUARANTINE}/{newest.folder}") for k in run_store.list())

    # A committed output damaged after the fact: its stage runs again, the rest is reused.
    model = next(f for f in run_store.list("finetune/output") if f.endswith(".safetensors"))
    run_store.local_path(model).write_bytes(b"\0" * run_store.list(model)[model])
    proc = start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    status = {s["stage"]: s["status"] for s in json.loads(out)["stages"]}
    # (from its last checkpoint, when one is kept: the output is rebuilt all the same)
    assert status["finetune"] in ("ran", "resumed")
    assert status["distill"] == status["fuse"] == "reused"
    assert "finetune/output" in err and "checksum mismatch" in err


@pytest.mark.slow
def test_a_failed_stage_says_why_in_its_own_words(tmp_path):
    doc = tiny(teacher={"uri": str(tmp_path / "no-model-here")})
    doc["spec"]["storage"] = {"uri": str(tmp_path / "store")}
    resource = tmp_path / "run.yaml"
    resource.write_text(yaml.safe_dump(doc))
    out = amber("run", str(resource))
    assert out.returncode == 2, out.stderr  # the stage's own words say the input is wrong
    first = out.stderr.strip().splitlines()[0]
    assert "stage score failed (exit 1): InvalidInput: teacher" in first, out.stderr
    assert "no diffusers model folder there" in first
    assert "log: " in out.stderr and "Traceback" not in out.stderr
    assert "torch.distributed" not in out.stderr  # no launcher banner
