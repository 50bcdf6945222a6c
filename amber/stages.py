"""Parameters of each compression stage, as they appear in `spec.stages[]`.

One class per stage type; the `type` field picks the class. Every knob has a default, so a
stage can be as short as `{type: prune}`. Defaults are the method of docs/design.md; the presets in
`amber.presets` only set what depends on the teacher's depth.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, NamedTuple, Union

from pydantic import Field, model_validator

from amber.base import Model

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Toleration(Model):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(None, description="key: taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="operator: Exists or Equal.")
    value: str | None = Field(None, description="value: taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="effect: taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None, description="tolerationSeconds: how long a NoExecute taint is tolerated."
    )


class ResourceSpec(Model):
    """What one stage's gang of pods asks for."""

    pods: int = Field(1, ge=1, le=1024, description="pods: pods in the gang (torchrun nodes).")
    gpus_per_pod: int = Field(
        8, ge=0, le=16, description="gpusPerPod: GPUs per pod (torchrun processes per node)."
    )
    cpu: str | None = Field(None, description="cpu: CPU request and limit per pod, e.g. '32'.")
    memory: str | None = Field(None, description="memory: memory request per pod, e.g. '512Gi'.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector: node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="tolerations: Kubernetes tolerations for the pods.",
    )

    @property
    def processes(self) -> int:
        """The gang's trainer processes: one per GPU, one per pod without GPUs."""
        return self.pods * max(1, self.gpus_per_pod)


class Student(NamedTuple):
    """The shape of the model a stage starts from: its depth (None before a prune stage has
    made one) and how many of its deepest blocks are single-stream."""

    layers: int | None = None
    single_layers: int = 0


class StageBase(Model):
    """What every stage has, and what a stage type *is*: the capabilities below are read by
    the planner, the pipeline rules, the cost model, publishing and the trainer's runner
    table (`amber_trainer.stages.<type>`), so a new stage type is one class and one runner."""

    makes_model: ClassVar[bool] = False
    """Its output is a model: later stages start from it, and the last one is published."""
    needs_student: ClassVar[bool] = False
    """It starts from a pruned student (a model-making stage before it)."""
    trains: ClassVar[bool] = False
    """It runs an optimiser (its memory is predicted; training throughput prices it)."""
    makes_score: ClassVar[bool] = False
    """Its output says which teacher layers survive; the next `reads_score` stage reads it."""
    reads_score: ClassVar[bool] = False
    """It reads the last score stage's output."""
    makes_data: ClassVar[bool] = False
    """Its output is every later stage's training data, so it comes first."""
    judges_models: ClassVar[bool] = False
    """It reads every model made before it (beside the teacher)."""

    name: str = Field(
        "",
        max_length=40,
        description="name: unique within the resource; defaults to the stage type. "
        "Names the stage's folder in storage and its Job.",
    )
    resources: ResourceSpec | None = Field(
        None, description="resources: replaces spec.resources for this stage."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data):
        if isinstance(data, dict) and not data.get("name"):
            data = {**data, "name": data.get("type") or cls.model_fields["type"].default}
        return data

    @model_validator(mode="after")
    def _check_name(self):
        if not DNS_LABEL.match(self.name):
            raise ValueError(
                f"name {self.name!r} must be a DNS label: lower-case letters, digits and '-'"
            )
        return self

    def student_after(self, student: Student, scored: int | None) -> Student:
        """The student a later stage starts from, given this stage's input and the depth the
        last score stage chose (None: no score stage yet). Most stages keep its shape."""
        return student

    def problems(self, student: Student, teacher_layers: int) -> list[str]:
        """This stage's own rules against its input student and the teacher's depth, as
        `field: reason` (or `: reason` for the stage as a whole) lines."""
        return []


class TrainingParams(Model):
    """Knobs shared by every stage that runs an optimiser."""

    steps: int = Field(1000, ge=1, description="steps: optimiser steps.")
    learning_rate: float = Field(1e-5, gt=0, description="learningRate: peak AdamW learning rate.")
    warmup_steps: int = Field(0, ge=0, description="warmupSteps: linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="weightDecay: AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="gradClip: max gradient norm (0 disables).")
    micro_batch_size: int = Field(1, ge=1, description="microBatchSize: samples per GPU per step.")
    gradient_accumulation: int = Field(
        1, ge=1, description="gradientAccumulation: micro-batches per optimiser step."
    )
    checkpoint_every: int = Field(
        500, ge=1, description="checkpointEvery: steps between committed checkpoints."
    )
    seed: int = Field(0, description="seed: seeds data order, noise and timesteps.")
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="ema: decay of an exponential moving average of the weights (0: none); "
        "the average, warmed up as min(ema, (1+n)/(10+n)) at step n, is what the stage saves.",
    )

    def planned_steps(self) -> int:
        """Optimiser steps the whole stage takes (its progress records' total)."""
        return self.steps


class EncodeStage(StageBase):
    """Image-text pairs -> cached VAE latents and text embeddings (safetensors shards)."""

    type: Literal["encode"] = "encode"
    makes_data: ClassVar[bool] = True
    resolution: int = Field(1024, ge=64, multiple_of=16, description="resolution: image side.")
    batch_size: int = Field(16, ge=1, description="batchSize: pairs per encoder batch.")
    shard_size: int = Field(1024, ge=1, description="shardSize: pairs per output shard.")
    max_text_tokens: int = Field(512, ge=1, description="maxTextTokens: text length cap.")


class ScoreStage(StageBase):
    """Timestep-sensitive layer importance, and the layers that survive pruning."""

    type: Literal["score"] = "score"
    makes_score: ClassVar[bool] = True
    target_layers: int = Field(
        ..., ge=1, description="targetLayers: layers the pruned student keeps."
    )
    criterion: Literal[
        "importance",
        "total-effect",
        "block-influence",
        "uniform",
        "first",
        "random",
        "explicit",
    ] = Field(
        "importance",
        description="criterion: which layers survive. 'importance' is the timestep-sensitive "
        "direct effect: the relative change of the velocity when a block's own update is "
        "removed from the final hidden state (one output-head call per block). The others "
        "are baselines for ablation: 'total-effect' (skip the block and re-run every later "
        "one), 'block-influence' (1 - cosine of a block's input and output, ShortGPT), "
        "'uniform' (evenly spaced, first and last included), 'first' (the first "
        "targetLayers), 'random' (seeded by seed) and 'explicit' (keepLayers).",
    )
    keep_layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        max_length=1024,
        description="keepLayers: with criterion explicit, the teacher blocks that survive "
        "(targetLayers distinct indices; the protected first and last blocks are not added).",
    )
    timesteps: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.05, 0.2, 0.4, 0.6, 0.8, 0.95],
        min_length=1,
        max_length=64,
        description="timesteps: flow-matching times t in (0, 1] at which blocks are scored.",
    )
    calibration_samples: int = Field(
        64, ge=1, description="calibrationSamples: (latent, text) pairs scored per timestep."
    )
    batch_size: int = Field(4, ge=1, description="batchSize: calibration samples per forward.")
    normalize: Literal["median", "max", "none"] = Field(
        "median",
        description="normalize: divide each timestep's column by its median over blocks "
        "(robust to one dominant block), by its max, or not at all, before aggregating.",
    )
    aggregate: Literal["max", "mean"] = Field(
        "mean",
        description="aggregate: 'mean' weighs timesteps by how the sampler uses them "
        "(see sampler, or timestepWeights); 'max' keeps a layer critical at any timestep.",
    )
    sampler: Literal["uniform", "shifted"] = Field(
        "uniform",
        description="sampler: the deployment sampler's schedule, which weighs timesteps for "
        "aggregate=mean: 'uniform' steps in t, or 'shifted' by samplerShift (flow-matching "
        "schedulers' resolution shift: more steps at high noise).",
    )
    sampler_shift: float = Field(
        3.0, gt=0, description="samplerShift: the shift of sampler=shifted."
    )
    timestep_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None,
        description="timestepWeights: one weight per timestep for aggregate=mean "
        "(replaces the sampler's).",
    )
    selection: Literal["spans", "top"] = Field(
        "spans",
        description="selection: 'spans' partitions the teacher into targetLayers contiguous "
        "spans of at most maxSpan blocks at least cost (dynamic programming; a span's cost "
        "is the importance of the blocks it drops), each kept as its representative block; "
        "'top' keeps the most important blocks and gives each removed block to its nearest.",
    )
    max_span: int = Field(
        4, ge=1, description="maxSpan: most teacher blocks one student block stands for."
    )
    mode: Literal["one-shot", "iterative"] = Field(
        "one-shot",
        description="mode: 'iterative' re-scores after each removal (slower, sees "
        "interactions; implies selection top).",
    )
    keep_first: int = Field(1, ge=0, description="keepFirst: always keep the first k blocks.")
    keep_last: int = Field(1, ge=0, description="keepLast: always keep the last k blocks.")
    seed: int = Field(0, description="seed: picks the calibration rows and their noise.")

    @model_validator(mode="after")
    def _check(self):
        if self.timestep_weights is not None:
            if self.aggregate != "mean":
                raise ValueError("timestepWeights is only used with aggregate: mean")
            if len(self.timestep_weights) != len(self.timesteps):
                raise ValueError(
                    f"timestepWeights has {len(self.timestep_weights)} entries, "
                    f"timesteps has {len(self.timesteps)}"
                )
        if (self.criterion == "explicit") != (self.keep_layers is not None):
            raise ValueError("keepLayers is given exactly when criterion is explicit")
        if self.keep_layers is not None and (
            len(set(self.keep_layers)) != len(self.keep_layers)
            or len(self.keep_layers) != self.target_layers
        ):
            raise ValueError(
                f"keepLayers must list targetLayers ({self.target_layers}) distinct blocks, "
                f"got {self.keep_layers}"
            )
        if self.keep_first + self.keep_last > self.target_layers:
            raise ValueError(
                f"keepFirst + keepLast ({self.keep_first + self.keep_last}) exceeds "
                f"targetLayers ({self.target_layers})"
            )
        return self

    def problems(self, student: Student, teacher_layers: int) -> list[str]:
        out = []
        if self.target_layers >= teacher_layers:
            out.append(
                f".targetLayers: {self.target_layers} is not below the teacher's "
                f"{teacher_layers} layers"
            )
        if self.keep_first + self.keep_last > teacher_layers:
            out.append(": keepFirst + keepLast exceeds the teacher's layers")
        return out


class PruneStage(StageBase):
    """Depth pruning to the scored layers, re-initialised by local weight averaging."""

    type: Literal["prune"] = "prune"
    makes_model: ClassVar[bool] = True
    reads_score: ClassVar[bool] = True
    init: Literal["representative", "average", "importance-weighted", "keep"] = Field(
        "representative",
        description="init: copy each span's representative block (its most important, or "
        "its middle one for spans of more than 3 blocks), average the span's blocks "
        "(uniformly or by importance), or copy the kept block as scored (ablation). The "
        "teacher's last block, which feeds the output head, is never averaged.",
    )
    refit_mlp: bool = Field(
        True,
        description="refitMlp: refit each student block's MLP output layers in closed form, "
        "in order, so that the block maps the student's own streams to the teacher's after "
        "its span.",
    )
    fit_samples: int = Field(
        256, ge=1, description="fitSamples: training rows the MLP refit is computed on."
    )
    seed: int = Field(0, description="seed: picks the refit's rows and their noise.")

    def student_after(self, student: Student, scored: int | None) -> Student:
        return Student(scored)


class DistillStage(StageBase, TrainingParams):
    """Layer-wise distillation of the pruned student from the frozen teacher."""

    type: Literal["distill"] = "distill"
    makes_model: ClassVar[bool] = True
    needs_student: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    mode: Literal["local", "global"] = Field(
        "local",
        description="mode: 'local' feeds each student block the teacher's input to its span; "
        "'global' runs the student on its own activations.",
    )
    output_loss_weight: float = Field(
        1.0, ge=0, description="outputLossWeight: weight of the velocity loss in global mode."
    )
    feature_loss: Literal["per-token", "relative"] = Field(
        "per-token",
        description="featureLoss: 'per-token' divides each token's squared error by the "
        "token's own target power (every token counts alike); 'relative' divides the "
        "block's mean squared error by its target's mean power.",
    )
    outlier_sigma: float = Field(
        4.0,
        ge=0,
        description="outlierSigma: per-token errors more than this many standard deviations "
        "above the batch mean are left out of the feature loss (0: none are).",
    )


class OnPolicyParams(Model):
    """Distillation on the student's own sampling trajectories (finetune; fuse's phases and
    closing fine-tune): noised training rows never show the student the states its own
    errors lead it to, so it never learns to steer back from them."""

    on_policy_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="onPolicyFraction: share of each micro-batch taken from the student's own "
        "sampling trajectories (Euler steps from noise on training captions, each one step "
        "further per micro-batch), trained on the frozen teacher's velocity there (in fuse's "
        "phases, on the input model's states); the rest are noised training rows (needs "
        "distillWeight > 0).",
    )
    sampler_steps: int = Field(
        50,
        ge=1,
        description="samplerSteps: Euler steps of the deployment sampler those trajectories "
        "follow.",
    )
    sampler_shift: float = Field(
        3.0,
        gt=0,
        description="samplerShift: the deployment sampler's time shift (1: uniform steps in t; "
        "more than 1: more steps at high noise), as score's samplerShift.",
    )

    def on_policy_rows(self, micro_batch: int) -> int:
        """Rows of a micro-batch of `micro_batch` taken from the trajectories (half rounds up)."""
        return min(micro_batch, int(self.on_policy_fraction * micro_batch + 0.5))

    def _check_on_policy(self, distill_weight: float) -> None:
        if self.on_policy_fraction > 0 and distill_weight == 0:
            raise ValueError(
                "onPolicyFraction needs distillWeight > 0: the student's own states have no "
                "flow-matching target, only the teacher's velocity"
            )


class FinetuneStage(StageBase, TrainingParams, OnPolicyParams):
    """Full-parameter flow-matching fine-tuning, optionally with output distillation."""

    type: Literal["finetune"] = "finetune"
    makes_model: ClassVar[bool] = True
    needs_student: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    timestep_sampling: Literal["logit-normal", "shifted", "uniform"] = Field(
        "logit-normal", description="timestepSampling: how training times t are drawn."
    )
    logit_mean: float = Field(0.0, description="logitMean: mean for logit-normal sampling.")
    logit_std: float = Field(1.0, gt=0, description="logitStd: std for logit-normal sampling.")
    shift: float = Field(3.0, gt=0, description="shift: time shift for 'shifted' sampling.")
    distill_weight: float = Field(
        0.0, ge=0, description="distillWeight: λ of the λ·||v - v_teacher||² term."
    )
    flow_weight: float = Field(
        1.0, ge=0, description="flowWeight: weight of the flow-matching ||v - (ε - x0)||² term."
    )

    @model_validator(mode="after")
    def _some_loss(self):
        if self.flow_weight == 0 and self.distill_weight == 0:
            raise ValueError("flowWeight and distillWeight are both 0: nothing to train on")
        self._check_on_policy(self.distill_weight)
        return self


class FuseStage(StageBase, TrainingParams, OnPolicyParams):
    """Progressive conversion of the deepest dual-stream blocks into single-stream blocks."""

    type: Literal["fuse"] = "fuse"
    makes_model: ClassVar[bool] = True
    needs_student: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    single_layers: int = Field(
        ..., ge=1, description="singleLayers: deepest student blocks made single-stream."
    )
    blocks_per_phase: int = Field(
        4, ge=1, description="blocksPerPhase: blocks converted per phase, deepest first."
    )
    finetune_steps: int = Field(
        0, ge=0, description="finetuneSteps: flow-matching steps after the last phase."
    )
    projection_init: Literal["sequential", "fitted", "image"] = Field(
        "sequential",
        description="projectionInit: a converted block's attention q, k, v are fitted by least "
        "squares to reproduce its dual block's image-branch projections on image tokens and "
        "text-branch ones on text tokens: 'sequential' on the converted model's own inputs, "
        "block by block, the text q, k scaled for the single block's RMSNorm; 'fitted' on "
        "the unconverted model's inputs; or copied from the 'image' branch alone.",
    )
    text_rank_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="textRankFraction: each single-stream block keeps a correction of the text "
        "tokens' q, k, v of rank this fraction of the model's width (at least 1; about "
        "4 x rank x width parameters a block), fitted as the text branch's best low-rank "
        "difference from the image branch's projections, which then serve image tokens "
        "exactly ('sequential' and 'fitted'; zero with 'image'); 0: none, one shared "
        "projection for both streams as in the paper.",
    )
    refit_mlp: bool = Field(
        False,
        description="refitMlp: after its q, k, v, refit each converted block's MLP output "
        "layer in closed form so that it maps the converted model's own streams to the dual "
        "block's output (needs projectionInit sequential).",
    )
    fit_samples: int = Field(
        256,
        ge=1,
        description="fitSamples: training rows a fitted init is computed on ('sequential' "
        "holds both models' streams for all of them in host memory).",
    )
    target: Literal["input", "previous"] = Field(
        "input",
        description="target: what every phase distils against: the stage's input model "
        "(one fixed target, so errors do not chain) or the previous phase's model.",
    )
    phase_optimizer: Literal["shared", "fresh"] = Field(
        "shared",
        description="phaseOptimizer: 'shared' carries the optimizer's moments and one "
        "warm-up and decay schedule across phases; 'fresh' starts both anew each phase.",
    )
    text_loss_weight: float = Field(
        0.1,
        ge=0,
        description="textLossWeight: weight of the text-stream feature loss of single-stream "
        "blocks (dual-stream ones weigh 1; the last block's text output is read by nothing "
        "and weighs 0).",
    )
    distill_weight: float = Field(
        0.0,
        ge=0,
        description="distillWeight: in the fine-tune after the last phase, λ of the "
        "λ·||v - v_teacher||² term against the frozen teacher.",
    )
    flow_weight: float = Field(
        1.0, ge=0, description="flowWeight: in that fine-tune, weight of the flow-matching term."
    )

    @model_validator(mode="after")
    def _refit_needs_sequential(self):
        if self.refit_mlp and self.projection_init != "sequential":
            raise ValueError(
                f"refitMlp needs projectionInit sequential (got {self.projection_init!r}): the "
                "refit reads the converted model's own streams"
            )
        self._check_on_policy(self.distill_weight)
        return self

    def student_after(self, student: Student, scored: int | None) -> Student:
        return student._replace(single_layers=self.single_layers)

    def problems(self, student: Student, teacher_layers: int) -> list[str]:
        if student.layers is not None and self.single_layers > student.layers:
            return [
                f".singleLayers: {self.single_layers} exceeds the student's {student.layers} layers"
            ]
        return []

    def planned_steps(self) -> int:
        # Phases from a dual-stream input; one that is partly fused already has fewer.
        phases = -(-self.single_layers // self.blocks_per_phase)
        return phases * self.steps + self.finetune_steps


class EvalStage(StageBase):
    """Teacher-vs-student velocity error per timestep bucket, and sample images."""

    type: Literal["eval"] = "eval"
    judges_models: ClassVar[bool] = True
    samples: int = Field(64, ge=1, description="samples: held-out pairs evaluated.")
    timestep_buckets: int = Field(10, ge=1, description="timestepBuckets: buckets over t.")
    batch_size: int = Field(8, ge=1, description="batchSize: pairs per forward.")
    sample_steps: int = Field(20, ge=1, description="sampleSteps: sampler steps for images.")
    seed: int = Field(0, description="seed: seeds held-out noise and sample images.")


STAGE_CLASSES = (
    EncodeStage,
    ScoreStage,
    PruneStage,
    DistillStage,
    FinetuneStage,
    FuseStage,
    EvalStage,
)
STAGE_TYPES = tuple(cls.model_fields["type"].default for cls in STAGE_CLASSES)
Stage = Annotated[Union[STAGE_CLASSES], Field(discriminator="type")]  # noqa: UP007
