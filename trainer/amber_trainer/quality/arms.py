"""The benchmark's arms: the amber-6b preset and one ablation each, every one an
`AmberCompression` run by `amber run`'s own code path. amber-6b is amber-10b plus fusion, so
its finetune stage is the amber-10b model (the 10B-style model) and its fuse stage the
6B-style one.

An arm is data (`Arm`: a name, a line saying what it changes, the stage fields it changes);
adding one to `catalogue` is all a new hypothesis needs. It keeps every other stage and
budget; arms of one seed share the stages they have in common (the committed output is
copied, and `amber run` reuses it because the stage's spec hash matches).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from amber import commits, presets
from amber.api import AmberCompression
from amber.local import run_resource
from amber.plan import OUTPUT, plan
from amber_trainer.quality import measure, task


@dataclass(frozen=True)
class Budget:
    """Stage sizes for 2 CPU cores; every arm of a benchmark uses the same."""

    calibration_samples: int = 64
    finetune_steps: int = 200
    warm_start_steps: int = 100  # an arm with a warm start takes them from finetune's
    fuse_steps: int = 100  # over all phases
    fuse_finetune_steps: int = 40
    micro_batch: int = 24
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class Arm:
    """One benchmark arm: a preset with stage fields changed, and how it is judged.

    `changes` maps stage names to the fields merged into them; `drop` removes stages;
    `warm_start` puts the presets' warm start (a local distill stage, these fields merged
    into it) before finetune, with its steps taken from finetune's; `judged` is the stage
    whose model is the arm's result and `against` the preset model it is compared with,
    prompt by prompt (None: a floor, compared with nothing). An arm out of the full run is
    kept so that what it measured can be measured again.
    """

    name: str
    description: str
    changes: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    warm_start: dict | None = None
    preset: str = "amber-10b"
    judged: str = "finetune"
    against: str | None = "finetune"
    full_run: bool = True  # False: run only when named (`--arms`), e.g. a probe measured once
    seeds: int | None = None  # how many of a run's seeds it runs on, the first ones (None: all)


# Arms whose question the full runs up to 2026-12-06 settled on three seeds (docs/quality.md
# has their last numbers): out of the full run, which has a time budget, and run again when
# named, as a change to what they test calls for.
SETTLED = (
    "keep-late",
    "no-span-fit",
    "flow-dominant",
    "no-ema",
    "warm-start-6b",
    "paper-hybrid",
    "fitted-fusion",
    "image-init-fusion",
    "chained-fusion",
)

# Arms that lost on each seed of the last full run with three (2026-12-06) by 8 to 59
# points, every one-seed paired interval at least 4.6 points clear of 0: one seed shows
# such a loss, and the seeds saved go to the arms whose differences are small.
ONE_SEED = ("v1-recipe-10b", "v1-recipe", "uniform", "random", "first", "init-average", "broken")

PRESET = "amber-6b"  # the arm every other arm is compared with; presets.MODEL_NAMES its models


# The first method's choices, stage by stage: the arms that put them back, one at a time
# and all together (v1-recipe), show what each change bought.
V1 = {
    "score": {
        "criterion": "total-effect",
        "selection": "top",
        "normalize": "max",
        "aggregate": "max",
    },
    "prune": {"init": "average", "refitMlp": False},
    "finetune": {"distillWeight": 0.5, "flowWeight": 1.0, "ema": 0.0, "onPolicyFraction": 0.0},
    "fuse": {
        "target": "previous",
        "phaseOptimizer": "fresh",
        "textLossWeight": 1.0,
        "distillWeight": 0.0,
        "flowWeight": 1.0,
        "ema": 0.0,
        "onPolicyFraction": 0.0,
        "projectionInit": "image",
        "textRankFraction": 0.0,  # and the paper's 80% single-stream, progressive: `catalogue`
    },
}
V1_WARM_START = {"featureLoss": "relative", "outlierSigma": 0.0}  # and it had one


def catalogue(budget: Budget, layers: int) -> dict[str, Arm]:
    """Every arm, by name, for a teacher of `layers` blocks. The first is the preset; the
    others change one thing each (budgets and the rest of the recipe stay), but v1-recipe,
    which puts back every choice of the first method."""
    student = max(1, layers // 2)

    def progressive(single: int) -> dict:
        """A quarter of `single` blocks per phase, the fusion steps shared out."""
        quarter = max(1, round(single / 4))
        phases = -(-single // quarter)
        return {"blocksPerPhase": quarter, "steps": budget.fuse_steps // phases}

    single = presets.single_layers(layers)
    paper_single = presets.single_layers(layers, presets.PAPER_SINGLE_SHARE)
    paper = {"singleLayers": paper_single, "blocksPerPhase": paper_single}
    v1_fuse = {**V1["fuse"], **paper, **progressive(paper_single)}
    v1 = {**V1, "fuse": v1_fuse}
    late = [0, *range(layers - student + 1, layers)]  # block 0 and the deepest ones
    fusion_steps = budget.fuse_steps + budget.fuse_finetune_steps

    def split(steps: int, name: str, how: str = "") -> Arm:
        """A probe: the fuse stage's steps split otherwise between its feature-distillation
        phase and its closing fine-tune."""
        return fusion(
            name,
            f"fuse: {steps} feature-distillation steps and {fusion_steps - steps} of the "
            f"closing fine-tune{how}, same total",
            {"fuse": {"steps": steps, "finetuneSteps": fusion_steps - steps}},
            full_run=False,
        )

    def longer(factor: int) -> Arm:
        """A probe of capacity against budget: the fuse stage with `factor` times the steps
        (both parts), so a 6B-style model that keeps climbing is short of training, not of
        weights."""
        return fusion(
            f"fusion-{factor}x",
            f"fuse: {factor} x the steps ({factor * budget.fuse_steps} feature-distillation, "
            f"{factor * budget.fuse_finetune_steps} fine-tune)",
            {
                "fuse": {
                    "steps": factor * budget.fuse_steps,
                    "finetuneSteps": factor * budget.fuse_finetune_steps,
                }
            },
            full_run=False,
        )

    v1_10b = {k: v for k, v in v1.items() if k != "fuse"}
    arms = [
        Arm(
            PRESET,
            "the preset: direct effect, spans, representative, KD-dominant finetune with "
            "EMA, one-shot fusion with fitted q, k, v",
            preset="amber-6b",
            judged="fuse",
            against=None,
        ),
        Arm(
            "amber-10b",
            "the preset without fusion (its finetune model is amber-6b's)",
            against=None,
            full_run=False,
        ),
        Arm(
            "v1-recipe-10b",
            "every choice of the first method (the v2 baseline)",
            v1_10b,
            warm_start=V1_WARM_START,
        ),
        fusion(
            "v1-recipe",
            "every choice of the first method, fusion included (the v2 baseline)",
            v1,
            warm_start=V1_WARM_START,
        ),
        Arm(
            "total-effect",
            "score.criterion: total-effect (the first criterion)",
            _criterion("total-effect"),
        ),
        Arm(
            "block-influence",
            "score.criterion: block-influence (ShortGPT cosine)",
            _criterion("block-influence"),
        ),
        Arm("uniform", "score.criterion: uniform (evenly spaced layers)", _criterion("uniform")),
        Arm("random", "score.criterion: random", _criterion("random")),
        Arm("first", "score.criterion: first (keep the first N layers)", _criterion("first")),
        Arm(
            "keep-late",
            f"score.keepLayers: block 0 and the deepest {student - 1} ({_ranges(late)})",
            {"score": {"criterion": "explicit", "keepLayers": late}},
        ),
        Arm(
            "top-selection",
            "score.selection: top (most important blocks, nearest spans)",
            {"score": {"selection": "top"}},
        ),
        Arm(
            "iterative",
            "score.mode: iterative (re-score after each removal; top selection)",
            {"score": {"mode": "iterative"}},
        ),
        Arm(
            "init-average",
            "prune.init: average (the span's blocks averaged)",
            {"prune": {"init": "average"}},
        ),
        Arm(
            "no-span-fit",
            "prune.refitMlp: false (the copied blocks as they are: no refit of their MLP "
            "outputs to their spans)",
            {"prune": {"refitMlp": False}},
        ),
        Arm(
            "flow-dominant",
            "the first finetune: flowWeight 1, distillWeight 0.5, no EMA, no on-policy rows",
            {"finetune": V1["finetune"]},
        ),
        Arm(
            "no-ema",
            "finetune.ema: 0 (the last weights are saved)",
            {"finetune": {"ema": 0.0}},
        ),
        Arm(
            "off-policy",
            "finetune.onPolicyFraction: 0 (noised training rows only, none of the student's "
            "own sampling states; the preset until 2026-12-06)",
            {"finetune": {"onPolicyFraction": 0.0}},
        ),
        Arm(
            "off-policy-longer",
            f"off-policy with {3 * budget.finetune_steps // 2} finetune steps (about the "
            "compute of the preset's on-policy steps)",
            {"finetune": {"onPolicyFraction": 0.0, "steps": 3 * budget.finetune_steps // 2}},
            full_run=False,
        ),
        Arm(
            "warm-start",
            f"a local layer-wise warm start (distill) of {budget.warm_start_steps} of "
            "finetune's steps (the preset until 2026-12)",
            warm_start={},
        ),
        Arm(
            "warm-start-relative",
            "warm-start with the block-level relative feature loss, no outlier mask",
            warm_start=V1_WARM_START,
            full_run=False,
        ),
        Arm(
            "warm-start-global",
            "a global layer-wise warm start (distill mode global: the student on its own "
            f"streams, every block against its span's end, plus the output) of "
            f"{budget.warm_start_steps} of finetune's steps",
            warm_start={"mode": "global"},
            full_run=False,
        ),
        fusion(
            "warm-start-6b",
            "warm-start, then the preset's fusion",
            warm_start={},
        ),
        fusion(
            "paper-hybrid",
            f"fuse: the paper's layout, {paper_single} of {student} blocks single-stream with one "
            "projection for both streams (textRankFraction 0; the preset until 2026-12-06)",
            {"fuse": {**paper, "textRankFraction": 0.0}},
        ),
        fusion(
            "no-text-correction",
            f"fuse.textRankFraction: 0 ({single} single-stream blocks, one projection for both "
            "streams: fewer parameters than the preset)",
            {"fuse": {"textRankFraction": 0.0}},
            full_run=False,
        ),
        fusion(
            "wider-hybrid",
            f"fuse: the paper's {paper_single} single-stream blocks, each with the preset's "
            "text correction (more parameters than the preset)",
            {"fuse": paper},
            full_run=False,
        ),
        fusion(
            "fusion-mlp-refit",
            "fuse.refitMlp: true (each converted block's MLP output layer refitted to its "
            "dual block's output after its q, k, v)",
            {"fuse": {"refitMlp": True}},
            full_run=False,
        ),
        fusion(
            "fitted-fusion",
            "fuse.projectionInit: fitted (the text correction fitted on the unfused model's "
            "inputs, not the converted model's own)",
            {"fuse": {"projectionInit": "fitted"}},
        ),
        fusion(
            "image-init-fusion",
            "fuse.projectionInit: image (q, k, v copied from the image branch, as the paper; "
            "the text correction starts at zero)",
            {"fuse": {"projectionInit": "image"}},
        ),
        fusion(
            "progressive-fusion",
            f"fuse: {progressive(single)['blocksPerPhase']} blocks per phase, deepest first, "
            "same total steps",
            {"fuse": progressive(single)},
        ),
        split(budget.fuse_steps // 2, "fusion-kd-heavy", " on the teacher's output"),
        split(budget.fuse_steps + budget.fuse_finetune_steps // 2, "fusion-feature-heavy"),
        longer(2),
        longer(4),
        fusion(
            "fusion-first",
            "no 10B-style stage: fuse the pruned model (one feature-distillation step), then "
            f"its closing fine-tune on the teacher's output for the "
            f"{budget.finetune_steps + fusion_steps - 1} steps the two stages had",
            {
                "fuse": {
                    "steps": 1,
                    "finetuneSteps": budget.finetune_steps + fusion_steps - 1,
                }
            },
            drop=("finetune",),
            full_run=False,
        ),
        fusion(
            "fusion-lr-2x",
            f"fuse.learningRate: {2 * budget.learning_rate:g} (twice the benchmark's rate)",
            {"fuse": {"learningRate": 2 * budget.learning_rate}},
            full_run=False,
        ),
        fusion(
            "fusion-no-warmup",
            "fuse.warmupSteps: 0 (the converted model starts at the full learning rate)",
            {"fuse": {"warmupSteps": 0}},
            full_run=False,
        ),
        fusion(
            "fusion-text-loss",
            "fuse.textLossWeight: 1 (single-stream blocks' text output weighs as much as a "
            "dual block's)",
            {"fuse": {"textLossWeight": 1.0}},
            full_run=False,
        ),
        fusion(
            "fusion-no-text-loss",
            "fuse.textLossWeight: 0 (single-stream blocks' text output is left free: only "
            "what image tokens read from it is fitted)",
            {"fuse": {"textLossWeight": 0.0}},
            full_run=False,
        ),
        fusion(
            "fusion-off-policy",
            "fuse.onPolicyFraction: 0 (phases and closing fine-tune on noised training rows "
            "only; the preset until 2026-12-06)",
            {"fuse": {"onPolicyFraction": 0.0}},
        ),
        fusion(
            "chained-fusion",
            "fuse: progressive, each phase distils the previous phase's model with a fresh "
            "optimiser, image-branch init, text loss on every block, no teacher in the "
            "fine-tune (the first fusion)",
            {"fuse": v1["fuse"]},
        ),
        Arm(
            "broken",
            "random layers, no averaging, no training (a pipeline that learns nothing)",
            {"score": {"criterion": "random"}, "prune": {"init": "keep", "refitMlp": False}},
            drop=("finetune",),
            judged="prune",
            against=None,
        ),
    ]
    return {
        arm.name: replace(
            arm,
            full_run=arm.full_run and arm.name not in SETTLED,
            seeds=1 if arm.name in ONE_SEED else arm.seeds,
        )
        for arm in arms
    }


def fusion(name: str, description: str, changes: dict | None = None, **more) -> Arm:
    """An arm that changes how the 10B-style model becomes the 6B-style one: amber-6b with
    `changes`, judged on its fuse stage against the preset's."""
    changes = changes or {}
    return Arm(name, description, changes, preset="amber-6b", judged="fuse", against="fuse", **more)


def _with_warm_start(raw: dict[str, dict], warm: dict, steps: int):
    """`raw`'s stages with `warm` before finetune, its `steps` taken from finetune's."""
    for name, stage in raw.items():
        if name == "finetune":
            yield "distill", {**warm, "name": "distill", "steps": steps}
            stage = {**stage, "steps": stage["steps"] - steps}
        yield name, stage


def _criterion(name: str) -> dict:
    return {"score": {"criterion": name}}


def _ranges(blocks: list[int]) -> str:
    """[0, 13, 14, 15] -> '0, 13-15'."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


SAMPLER = ("samplerSteps", "samplerShift")


def overrides(budget: Budget, seed: int) -> dict[str, dict]:
    train = {
        "microBatchSize": budget.micro_batch,
        "learningRate": budget.learning_rate,
        "warmupSteps": 10,
        "checkpointEvery": 10_000,
        "seed": seed,
    }
    # The on-policy trajectories follow the sampler every model is judged with.
    sampler = dict(zip(SAMPLER, (measure.SAMPLE_STEPS, measure.SHIFT), strict=True))
    return {
        # The benchmark samples with a uniform Euler schedule: timesteps weigh alike.
        "prune": {"seed": seed},
        "score": {
            "calibrationSamples": budget.calibration_samples,
            "batchSize": 16,
            "seed": seed,
            "sampler": "uniform",
        },
        "finetune": {**train, **sampler, "steps": budget.finetune_steps},
        "fuse": {
            **train,
            **sampler,
            "steps": budget.fuse_steps,
            "finetuneSteps": budget.fuse_finetune_steps,
        },
        "eval": {"samples": 64, "timestepBuckets": 5, "sampleSteps": 20, "seed": seed},
    }


def stages(arm: Arm, layers: int, budget: Budget, seed: int) -> list[dict]:
    """The arm's `spec.stages`: its preset's with the arm's changes. Only the preset arm
    keeps the eval stage (the benchmark judges every model itself)."""
    fields = overrides(budget, seed)
    if arm.preset == "amber-10b":
        del fields["fuse"]
    raw = {s.name: s.dump() for s in presets.build(arm.preset, layers, fields)}
    for name, change in arm.changes.items():
        raw[name] = {**raw[name], **change}
    if arm.warm_start is not None:
        # The warm start trains as finetune does (the benchmark's batch, rate and seed; it
        # has no on-policy rows, so no sampler).
        tuning = {k: v for k, v in fields["finetune"].items() if k not in SAMPLER}
        warm = {**presets.warm_start(), **tuning, **arm.warm_start}
        raw = dict(_with_warm_start(raw, warm, budget.warm_start_steps))
    drop = set(arm.drop) | ({"eval"} if arm.name != PRESET else set())
    return [stage for name, stage in raw.items() if name not in drop]


def resource(
    arm: Arm, seed: int, layers: int, teacher_uri: str, data_uri: str, store_uri: str, budget
) -> AmberCompression:
    """The arm for seed `seed` on a teacher of `layers` blocks, as a resource."""
    return AmberCompression.model_validate(
        {
            "apiVersion": "amber.dev/v1alpha1",
            "kind": "AmberCompression",
            "metadata": {"name": f"{arm.name}-s{seed}"},
            "spec": {
                "teacher": {"uri": teacher_uri},
                "data": {"cacheUri": data_uri},
                "storage": {"uri": store_uri},
                "resources": {"pods": 1, "gpusPerPod": 0},
                # Recomputing activations saves memory that a benchmark on a CPU does not
                # need; without it the gradients are the same up to float rounding.
                "deepspeed": {
                    "zeroStage": 0,
                    "precision": "fp32",
                    "activationCheckpointing": False,
                },
                "stages": stages(arm, layers, budget, seed),
            },
        }
    )


DATA_STAMP = "inputs.json"  # what a data folder was written from, written last
DATA_FORMAT = 1  # bump when what write_data writes changes


def write_data(folder: Path, samples: int, seed: int, teacher=None, pool: int = 0) -> Path:
    """Training pairs as the encode stage writes them (`data.cacheUri`) and, with a
    `teacher` and `pool` > 0, the teacher's targets for `pool` entries of each timestep
    distribution the recipes train with: distillation's (uniform, with hidden states) and
    fine-tuning's (velocities). Every arm and seed of a run reads them. A folder that
    holds them for the same inputs already is kept (a run started again, or a second run
    on the same work folder): the pool is most of the cost."""
    import torch
    from safetensors.torch import save_file

    from amber_trainer import data
    from amber_trainer.quality import fixtures
    from amber_trainer.train import targets

    pooled = teacher is not None and pool > 0
    inputs = {
        "format": DATA_FORMAT,
        "samples": samples,
        "seed": seed,
        "pool": pool if pooled else 0,
        "teacher": targets.fingerprint(teacher) if pooled else None,
    }
    stamp = folder / DATA_STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == inputs:
        return folder
    stamp.unlink(missing_ok=True)  # a write cut short below is never taken as whole
    train, _ = task.split()
    tokens, emb, mask, _ = fixtures.dataset(train, samples, seed)
    folder.mkdir(parents=True, exist_ok=True)
    shard = folder / "pairs-00000.safetensors"
    save_file(
        {
            "latents": tokens.contiguous(),
            "text": emb.contiguous(),
            "text_mask": mask.contiguous(),
            "side": torch.tensor(task.SIDE),
        },
        str(shard),
    )
    if pooled:
        rows, _ = data.load_shards([shard]).split()  # what the stages train on
        finetune = next(s for s in presets.build("amber-10b", 4, {}) if s.type == "finetune")
        for sampling, states in ((targets.UNIFORM, True), (targets.sampling_of(finetune), False)):
            built = targets.build(teacher, rows, pool, sampling, seed + 1, with_states=states)
            targets.save(built, folder)
    stamp.write_text(json.dumps(inputs))  # last
    return folder


def run_arm(obj: AmberCompression) -> dict[str, Path]:
    """Run one arm; the local folder of each of its stages' committed output, by stage name.

    Stages that other arms committed in the same store under the same spec hash are copied
    in first, so `amber run` reuses them (the arms of a seed share a store).
    """
    runs = plan(obj)
    committed = committed_stages(Path(obj.spec.storage.uri))
    for run in runs:
        source = committed.get(run.spec_hash)
        target = Path(run.run_uri) / run.stage.name / OUTPUT
        if source is not None and not target.exists():
            shutil.copytree(source, target)
    run_resource(obj, launcher="here")
    return {run.stage.name: Path(run.run_uri) / run.stage.name / OUTPUT for run in runs}


def committed_stages(store: Path) -> dict[str, Path]:
    """Spec hash -> a committed stage output in a local store (namespace/run/stage/output).
    A folder without its marker is being written, or was cut short: it is not offered."""
    found: dict[str, Path] = {}
    for marker in sorted(store.glob(f"*/*/*/{OUTPUT}/{commits.MARKER}")):
        spec_hash = json.loads(marker.read_text()).get("spec_hash")
        if spec_hash:
            found.setdefault(spec_hash, marker.parent)
    return found


def spec_hashes(obj: AmberCompression) -> set[str]:
    return {run.spec_hash for run in plan(obj)}
