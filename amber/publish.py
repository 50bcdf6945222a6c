"""Publishing the final model: `{run}/final/`, a diffusers folder with a model card.

The files are copied inside the store (server-side on S3) from the last model stage's
committed output, then `final/COMMIT.json` is written last, like every other output. When
the teacher is a pipeline folder (`model_index.json`), `final/` is one too: the compressed
model in `transformer/`, the teacher's other components (VAE, text encoder, tokenizer,
scheduler) copied beside it (server-side between S3 prefixes) and checksummed into the
marker, and `model_index.json` naming the hybrid class's module when it has one. It needs
no torch, so the operator can publish too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

from amber import commits, lease
from amber.api import AmberCompression
from amber.errors import InvalidInput, StorageError
from amber.layout import FINAL
from amber.plan import OUTPUT, StageRun
from amber.storage import Store, open_store

PIPELINE_INDEX = "model_index.json"
TRANSFORMER = "transformer"


def model_card(
    obj: AmberCompression, runs: list[StageRun], store: Store, source: str, pipeline: bool = False
) -> str:
    """A README for the final folder: recipe, layer map, parameter counts, metrics."""
    how = (
        "It is a whole pipeline folder: `diffusers.DiffusionPipeline.from_pretrained(folder, "
        "trust_remote_code=True)` (or `QwenImagePipeline.from_pretrained`, a depth-pruned "
        "model needing no remote code) loads it with its transformer in `transformer/` "
        "(a hybrid-stream one brings its class in `transformer/amber_hybrid.py`)."
        if pipeline
        else "Load it with plain diffusers, Amber not needed: "
        "`diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` (a "
        "hybrid-stream model brings its class in `amber_hybrid.py`; a depth-pruned one is a "
        "stock `QwenImageTransformer2DModel` and needs no remote code)."
    )
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [amber, depth-pruning, distillation, qwen-image]",
        "---",
        f"# {obj.metadata.name}",
        "",
        f"Compressed with Amber from teacher `{obj.spec.teacher.uri or 'config'}` "
        f"({obj.spec.teacher.num_layers} layers). {how}",
        "",
        "## Recipe",
        "",
        "| # | stage | type | parameters |",
        "|---|---|---|---|",
    ]
    for run in runs:
        params = {k: v for k, v in run.stage.dump().items() if k not in ("name", "type")}
        lines.append(
            f"| {run.index} | {run.stage.name} | {run.stage.type} | `{json.dumps(params)}` |"
        )
    lines += ["", "## Results", ""]
    for run in runs:
        manifest = commits.read_manifest(store, f"{run.stage.name}/{OUTPUT}")
        if manifest is None:
            continue
        shown = {k: v for k, v in manifest.metrics.items() if not isinstance(v, list)}
        lines.append(f"- **{run.stage.name}**: `{json.dumps(shown)}`")
    layer_map_key = f"{source}/{OUTPUT}/layer_map.json"
    if store.exists(layer_map_key):
        entries = json.loads(store.read_text(layer_map_key))
        lines += ["", "## Layer map (student block <- teacher span)", ""]
        lines += [
            f"- {e['student']} <- teacher {e['span'][0]}..{e['span'][1]} (kept {e['teacher']})"
            for e in entries
        ]
    return "\n".join(lines) + "\n"


def teacher_pipeline(obj: AmberCompression) -> Store | None:
    """The teacher's folder when it is a diffusers pipeline (it has `model_index.json`)."""
    uri, storage = obj.spec.teacher.uri, obj.spec.storage
    if uri is None:
        return None
    teacher = open_store(uri, storage.endpoint, storage.region)
    return teacher if teacher.exists(PIPELINE_INDEX) else None


def pipeline_index(teacher_index: dict, transformer_config: dict) -> dict:
    """The final pipeline's `model_index.json`: the teacher's, with the transformer entry
    naming the compressed class's module when it brings one (`auto_map`)."""
    index = dict(teacher_index)
    remote = transformer_config.get("auto_map", {}).get("AutoModel")
    if remote:
        module, cls = remote.rsplit(".", 1)
        index[TRANSFORMER] = [module, cls]
    return index


def components(teacher: Store, index: dict) -> dict[str, int]:
    """The teacher pipeline's files other than its transformer: key -> size."""
    names = {k for k, v in index.items() if not k.startswith("_") and k != TRANSFORMER and v}
    return {key: size for key, size in teacher.list().items() if key.split("/")[0] in names}


def publish_final(
    obj: AmberCompression,
    runs: list[StageRun],
    store: Store,
    log=print,
    fence: lease.Fence | None = None,
) -> commits.Manifest:
    """Copy the last model stage's model to `final/` and commit it, unless `final/` already
    holds exactly that (same spec hash, files and card): a rerun of a finished pipeline
    writes nothing there, where a 6B model would be about 12 GB copied again."""
    sources = [r for r in runs if r.stage.makes_model]
    if not sources:
        raise InvalidInput("the pipeline produces no model (it has no prune stage)")
    last = sources[-1]
    output = commits.read_manifest(store, f"{last.stage.name}/{OUTPUT}")
    if output is None:
        raise StorageError(f"{store.uri}: stage {last.stage.name} has no committed output")
    teacher = teacher_pipeline(obj)
    into = f"{TRANSFORMER}/" if teacher is not None else ""
    copies = {
        into + name.removeprefix("model/"): (name, entry)
        for name, entry in output.files.items()
        if name.startswith("model/")
    }
    written = {"README.md": model_card(obj, runs, store, last.stage.name, teacher is not None)}
    parts: dict[str, int] = {}
    if teacher is not None:
        teacher_index = json.loads(teacher.read_text(PIPELINE_INDEX))
        config = json.loads(store.read_text(f"{output.folder}/model/config.json"))
        index = pipeline_index(teacher_index, config)
        written[PIPELINE_INDEX] = json.dumps(index, indent=2) + "\n"
        parts = components(teacher, index)
    files = {relative: entry for relative, (_, entry) in copies.items()}
    for key, text in written.items():
        files[key] = commits.FileEntry(
            size=len(text.encode()), sha256=hashlib.sha256(text.encode()).hexdigest()
        )
    published = commits.read_output(store, FINAL, log)  # a damaged one is published again
    for key, size in parts.items():
        # The teacher's components are hashed once: a republish trusts its own marker for
        # a file of the same size (they are the teacher's, which a run never changes).
        known = published.files.get(key) if published is not None else None
        same = known is not None and known.size == size
        files[key] = known if same else commits.FileEntry(size=size, sha256=teacher.sha256(key))
    if (
        published is not None
        and published.spec_hash == last.spec_hash
        and published.files == files
        and published.metrics.get("source") == last.stage.name
    ):
        return published
    store.delete(FINAL)  # nothing of another layout (bare transformer, pipeline) stays
    try:
        for relative, (name, _) in copies.items():
            store.copy(f"{output.folder}/{name}", f"{FINAL}/{relative}")
        for key in parts:
            store.copy_from(teacher, key, f"{FINAL}/{key}")
        for key, text in written.items():
            store.write_text(f"{FINAL}/{key}", text)
    except StorageError:
        # A disk that filled up halfway: no half model left where people look for one.
        with contextlib.suppress(StorageError):
            store.delete(FINAL)
        raise
    return commits.write_marker(
        store, FINAL, output.step, files, {"source": last.stage.name}, last.spec_hash, fence
    )
