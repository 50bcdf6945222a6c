"""Publishing the final model: `{run}/final/`, a diffusers folder with a model card.

The files are copied inside the store (server-side on S3) from the last model stage's
committed output, then `final/COMMIT.json` is written last, like every other output. It
needs no torch, so the operator can publish too.
"""

from __future__ import annotations

import hashlib
import json

from amber import commits
from amber.api import AmberCompression
from amber.errors import InvalidInput, StorageError
from amber.plan import FINAL, MODEL_STAGES, OUTPUT, StageRun
from amber.storage import Store


def model_card(obj: AmberCompression, runs: list[StageRun], store: Store, source: str) -> str:
    """A README for the final folder: recipe, layer map, parameter counts, metrics."""
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [amber, depth-pruning, distillation, qwen-image]",
        "---",
        f"# {obj.metadata.name}",
        "",
        f"Compressed with Amber from teacher `{obj.spec.teacher.uri or 'config'}` "
        f"({obj.spec.teacher.num_layers} layers). Load it with plain diffusers, Amber not "
        "needed: `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` "
        "(a hybrid-stream model brings its class in `amber_hybrid.py`; a depth-pruned one is "
        "a stock `QwenImageTransformer2DModel` and needs no remote code).",
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


def publish_final(
    obj: AmberCompression, runs: list[StageRun], store: Store, log=print
) -> commits.Manifest:
    """Copy the last model stage's model to `final/` and commit it, unless `final/` already
    holds exactly that (same spec hash, files and card): a rerun of a finished pipeline
    writes nothing there, where a 6B model would be about 12 GB copied again."""
    sources = [r for r in runs if r.stage.type in MODEL_STAGES]
    if not sources:
        raise InvalidInput("the pipeline produces no model (it has no prune stage)")
    last = sources[-1]
    output = commits.read_manifest(store, f"{last.stage.name}/{OUTPUT}")
    if output is None:
        raise StorageError(f"{store.uri}: stage {last.stage.name} has no committed output")
    copies = {
        name.removeprefix("model/"): (name, entry)
        for name, entry in output.files.items()
        if name.startswith("model/")
    }
    card = model_card(obj, runs, store, last.stage.name)
    files = {relative: entry for relative, (_, entry) in copies.items()}
    files["README.md"] = commits.FileEntry(
        size=len(card.encode()), sha256=hashlib.sha256(card.encode()).hexdigest()
    )
    published = commits.read_output(store, FINAL, log)  # a damaged one is published again
    if (
        published is not None
        and published.spec_hash == last.spec_hash
        and published.files == files
        and published.metrics.get("source") == last.stage.name
    ):
        return published
    for relative, (name, _) in copies.items():
        store.copy(f"{output.folder}/{name}", f"{FINAL}/{relative}")
    store.write_text(f"{FINAL}/README.md", card)
    return commits.write_marker(
        store, FINAL, output.step, files, {"source": last.stage.name}, last.spec_hash
    )
