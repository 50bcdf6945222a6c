"""Stores and the commit-marker protocol, against a local folder and the loopback S3 server."""

from __future__ import annotations

import json

import pytest

from amber import commits
from amber.storage import LocalStore, S3Store, StorageError, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/runs")


def write_files(folder, files: dict[str, bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_open_store_picks_backend(tmp_path, s3_env):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/a/b/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket", "a/b", "s3://bucket/a/b")
    with pytest.raises(StorageError, match="only s3://"):
        open_store("gs://bucket/x")


def test_bytes_roundtrip_and_listing(store):
    store.write_text("a/b.txt", "hello")
    store.write_bytes("a/c/d.bin", b"\x00" * 10)
    store.write_text("ab/e.txt", "not under a/")
    assert store.read_text("a/b.txt") == "hello"
    assert store.list("a") == {"a/b.txt": 5, "a/c/d.bin": 10}
    assert store.exists("a/b.txt") and not store.exists("a/zzz")
    child = store.child("a")
    assert child.read_text("b.txt") == "hello"
    assert child.list() == {"b.txt": 5, "c/d.bin": 10}
    store.delete("a")
    assert store.list("a") == {}
    assert store.list() == {"ab/e.txt": 12}
    with pytest.raises(StorageError):
        store.read_bytes("a/b.txt")


def test_local_writes_are_atomic_and_stay_inside(tmp_path):
    store = LocalStore(tmp_path)
    store.write_text("x/y.json", "{}")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y.json"]
    with pytest.raises(StorageError, match="escapes"):
        store.write_text("../outside.txt", "no")


def test_commit_then_fetch_verifies(store, tmp_path):
    src = write_files(tmp_path / "ckpt", {"model.safetensors": b"w" * 100, "sub/state.pt": b"s"})
    manifest = commits.commit(store, "distill/checkpoints/step-0000000010", src, 10, {"loss": 0.5})
    assert set(manifest.files) == {"model.safetensors", "sub/state.pt"}
    latest = commits.latest_checkpoint(store, "distill")
    assert latest.step == 10 and latest.metrics == {"loss": 0.5}
    out = commits.fetch(store, latest, tmp_path / "out")
    assert (out / "sub/state.pt").read_bytes() == b"s"


def test_partial_checkpoints_are_never_used(store, tmp_path):
    src = write_files(tmp_path / "c", {"model.bin": b"1" * 50})
    commits.commit(store, f"s/{commits.checkpoint_folder(100)}", src, 100)
    # Newer checkpoint whose files landed but whose marker was never written (killed writer):
    store.write_bytes(f"s/{commits.checkpoint_folder(200)}/model.bin", b"2" * 50)
    # Newer still, marker present but a file truncated (e.g. a store that lost an object):
    manifest = commits.commit(store, f"s/{commits.checkpoint_folder(300)}", src, 300)
    store.write_bytes(f"{manifest.folder}/model.bin", b"short")
    assert commits.latest_checkpoint(store, "s").step == 100
    assert commits.latest_checkpoint(store, "other") is None


def test_checksum_mismatch_is_an_error(store, tmp_path):
    src = write_files(tmp_path / "c", {"w.bin": b"abcd"})
    manifest = commits.commit(store, "out", src, 1)
    store.write_bytes("out/w.bin", b"abce")  # same size, different bytes
    with pytest.raises(StorageError, match="checksum"):
        commits.fetch(store, commits.read_manifest(store, "out"), tmp_path / "f")
    assert manifest.files["w.bin"].size == 4


def test_newest_committed_wins_and_old_ones_are_pruned(store, tmp_path):
    src = write_files(tmp_path / "c", {"w.bin": b"x"})
    for step in (1, 2, 10, 11):
        commits.commit(store, f"ft/{commits.checkpoint_folder(step)}", src, step)
    assert commits.latest_checkpoint(store, "ft").step == 11
    commits.prune_checkpoints(store, "ft", keep=2)
    steps = sorted(
        json.loads(store.read_text(k))["step"]
        for k in store.list("ft")
        if k.endswith("COMMIT.json")
    )
    assert steps == [10, 11]


def test_credentials_from_a_mounted_secret(bucket, s3_env, tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("from-secret\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("from-secret-key\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AMBER_S3_SECRET_DIR", str(secret))
    store = open_store(f"s3://{bucket}/p")
    assert store.client._request_signer._credentials.access_key == "from-secret"
    store.write_text("k", "v")
    assert store.read_text("k") == "v"


def test_missing_bucket_is_a_clear_error(s3_env):
    store = open_store("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.write_text("k", "v")


def _stamps(store, prefix: str) -> dict[str, tuple]:
    """What a reader sees of every object under `prefix`: its bytes and when it was last
    written (the file's mtime, or S3's LastModified and ETag)."""
    out = {}
    for key in store.list(prefix):
        path = store.local_path(key)
        if path is not None:
            when = path.stat().st_mtime_ns
        else:
            head = store.client.head_object(Bucket=store.bucket, Key=store._key(key))
            when = (head["LastModified"], head["ETag"])
        out[key] = (store.read_bytes(key), when)
    return out


def test_publishing_an_unchanged_final_model_writes_nothing(store, tmp_path):
    import time

    from amber.layout import FINAL
    from amber.plan import plan
    from amber.publish import publish_final
    from amber.resource import parse
    from trainer_helpers import tiny_resource

    obj = parse(tiny_resource(store.uri))
    runs = plan(obj)
    last = next(r for r in reversed(runs) if r.stage.type == "fuse")
    model = write_files(tmp_path / "out", {"model/config.json": b"{}", "model/w.bin": b"w" * 64})
    commits.commit(store, f"{last.stage.name}/output", model, 7, spec_hash=last.spec_hash)

    first = publish_final(obj, runs, store)
    assert store.read_bytes(f"{FINAL}/w.bin") == b"w" * 64
    before = _stamps(store, FINAL)
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    again = publish_final(obj, runs, store)
    assert again.files == first.files
    assert _stamps(store, FINAL) == before  # not one object rewritten

    # A model that changed, or a damaged final folder, is published again.
    model = write_files(tmp_path / "out2", {"model/config.json": b"{}", "model/w.bin": b"v" * 64})
    commits.commit(store, f"{last.stage.name}/output", model, 8, spec_hash=last.spec_hash)
    publish_final(obj, runs, store)
    assert store.read_bytes(f"{FINAL}/w.bin") == b"v" * 64
    store.write_bytes(f"{FINAL}/w.bin", b"v" * 63)
    publish_final(obj, runs, store, log=lambda message: None)
    assert store.read_bytes(f"{FINAL}/w.bin") == b"v" * 64


@pytest.mark.parametrize("teacher_on", ["same backend", "local disk"])
def test_a_pipeline_teacher_is_published_as_a_whole_pipeline(store, tmp_path, teacher_on):
    import hashlib
    import json
    import time

    from amber.layout import FINAL
    from amber.plan import plan
    from amber.publish import publish_final
    from amber.resource import parse
    from trainer_helpers import tiny_resource

    parts = {
        "model_index.json": json.dumps(
            {
                "_class_name": "QwenImagePipeline",
                "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKLQwenImage"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "feature_extractor": [None, None],
            }
        ).encode(),
        "transformer/config.json": b"{}",
        "transformer/w.bin": b"teacher" * 9,
        "vae/config.json": b"{}",
        "vae/w.bin": b"v" * 300,
        "tokenizer/vocab.json": b"{}",
        "notes/unrelated.txt": b"not a component",
    }
    if teacher_on == "local disk" or store.local_path("x") is not None:
        teacher_uri = str(write_files(tmp_path / "teacher", parts))
    else:
        teacher_uri = store.uri.rsplit("/", 1)[0] + "/teachers/pipe"
        teacher_store = open_store(teacher_uri)
        for key, data in parts.items():
            teacher_store.write_bytes(key, data)
    doc = tiny_resource(store.uri)
    doc["spec"]["teacher"] = {"uri": teacher_uri, "numLayers": 12}
    obj = parse(doc)
    runs = plan(obj)
    last = next(r for r in reversed(runs) if r.stage.type == "fuse")
    hybrid = {"auto_map": {"AutoModel": "amber_hybrid.AmberHybridTransformer2DModel"}}
    model = write_files(
        tmp_path / "out",
        {
            "model/config.json": json.dumps(hybrid).encode(),
            "model/w.bin": b"s" * 64,
            "model/amber_hybrid.py": b"# the class",
        },
    )
    commits.commit(store, f"{last.stage.name}/output", model, 7, spec_hash=last.spec_hash)

    first = publish_final(obj, runs, store)
    files = sorted(store.list(FINAL))
    assert files == sorted(
        f"{FINAL}/{k}"
        for k in (
            "COMMIT.json",
            "README.md",
            "model_index.json",
            "transformer/config.json",
            "transformer/w.bin",
            "transformer/amber_hybrid.py",
            "vae/config.json",
            "vae/w.bin",
            "tokenizer/vocab.json",
        )
    )
    index = json.loads(store.read_text(f"{FINAL}/model_index.json"))
    assert index["transformer"] == ["amber_hybrid", "AmberHybridTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert store.read_bytes(f"{FINAL}/vae/w.bin") == b"v" * 300
    assert first.files["vae/w.bin"].sha256 == hashlib.sha256(b"v" * 300).hexdigest()
    assert "DiffusionPipeline.from_pretrained" in store.read_text(f"{FINAL}/README.md")

    before = _stamps(store, FINAL)
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    assert publish_final(obj, runs, store).files == first.files
    assert _stamps(store, FINAL) == before  # not one object rewritten

    # A component copied short is caught by the marker and copied again.
    store.write_bytes(f"{FINAL}/vae/w.bin", b"v" * 299)
    publish_final(obj, runs, store, log=lambda message: None)
    assert store.read_bytes(f"{FINAL}/vae/w.bin") == b"v" * 300
