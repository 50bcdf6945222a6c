"""Per-GPU memory of each stage of a recipe, predicted from shapes alone (meta-device models).

A training step's peak on one GPU is what stays resident, plus the larger of two phases:

- resident: the frozen teacher in bf16 (every process runs it), the trained model's bf16
  weights (2 B per parameter), fp32 master weights and Adam's two moments (12 B), and the
  teacher's hidden states the layer-wise objectives read;
- backward: the activations kept for it, `ACTIVATION_BYTES` per token per hidden unit per
  block (every block without activation checkpointing; with it, each block's input streams
  plus one block's full set during its recompute). Gradients grow as activations are freed,
  so this phase peaks where it starts;
- optimizer step: bf16 gradients (2 B) and their fp32 copies (4 B).

ZeRO divides by the world size: the fp32 state and fp32 gradients from stage 1, the bf16
gradients from stage 2, the bf16 weights at stage 3. `ACTIVATION_BYTES` were measured on an
H200 (bf16, flash attention, `bench/gpu_step.py`, docs/performance.md) and checked there
against other depths and batch sizes. Sizes are `torch.cuda.max_memory_allocated` terms:
the CUDA context (about 0.5 GiB) comes on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from amber import lineage
from amber.plan import StageRun
from amber_trainer.model import models
from amber_trainer.surgery import fuse

GIB = 2**30
# bytes kept for backward per token per hidden unit by one block (bf16), by execution mode
ACTIVATION_BYTES = {"eager": 63.0, "compiled": 45.0}
WORKSPACE_BYTES = 0.1 * GIB  # cuBLAS workspaces, allocator rounding


@dataclass(frozen=True)
class Shape:
    """One micro-batch as the transformer sees it."""

    micro_batch: int
    image_tokens: int  # (resolution / 16)^2: VAE /8, then 2x2 patches
    text_tokens: int

    @classmethod
    def at(cls, resolution: int, text_tokens: int, micro_batch: int) -> Shape:
        return cls(micro_batch, (resolution // 16) ** 2, text_tokens)

    @property
    def tokens(self) -> int:
        return self.micro_batch * (self.image_tokens + self.text_tokens)


@dataclass(frozen=True)
class StageMemory:
    stage: str
    type: str
    world: int
    teacher: float  # bytes, per GPU
    weights: float
    gradients: float
    optimizer: float
    activations: float
    teacher_states: float
    workspace: float

    @property
    def total(self) -> float:
        resident = self.teacher + self.weights + self.optimizer + self.teacher_states
        return resident + max(self.activations, self.gradients) + self.workspace

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def state_bytes(params: int, zero_stage: int, world: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU for `params` trained parameters."""

    def share(from_stage: int) -> float:
        return 1 / world if zero_stage >= from_stage else 1.0

    weights = 2 * params * share(3)
    gradients = 2 * params * share(2) + 4 * params * share(1)
    optimizer = 12 * params * share(1)
    return weights, gradients, optimizer


def activation_bytes(
    blocks: int, width: int, shape: Shape, checkpointing: bool, mode: str
) -> float:
    """Bytes kept for backward by `blocks` trained blocks of hidden size `width`."""
    per_block = ACTIVATION_BYTES[mode] * shape.tokens * width
    if not checkpointing:
        return blocks * per_block
    inputs = 2 * shape.tokens * width  # each block keeps its two input streams (bf16)
    return blocks * inputs + per_block


def stage_models(run: StageRun, teacher: dict, student: dict) -> tuple[dict | None, dict]:
    """(frozen model config or None, trained model config) of a training stage."""
    stage = run.stage
    if stage.type == "distill":
        return teacher, student
    if stage.type == "finetune":
        return (teacher if stage.distill_weight > 0 else None), student
    # fuse: each phase distils from the previous phase's model, of the student's size
    return student, fuse.fused_config(student, stage)


def predict(
    run: StageRun, teacher: dict, student: dict, shape: Shape, world: int, mode: str = "compiled"
) -> StageMemory:
    """Peak bytes per GPU of one training step of `run` (a distill, finetune or fuse stage)."""
    frozen, trained = stage_models(run, teacher, student)
    model = models.build_empty(trained)
    params = models.count_parameters(model)
    depth = len(model.transformer_blocks)
    width = trained.get("num_attention_heads", 24) * trained.get("attention_head_dim", 128)
    ds = run.deepspeed
    zero = ds.zero_stage_for(world)
    weights, gradients, optimizer = state_bytes(params, zero, world)
    if ds.offload == "cpu":
        optimizer = 0.0
    activations = activation_bytes(depth, width, shape, ds.activation_checkpointing, mode)
    teacher_bytes = states = 0.0
    if frozen is not None:
        teacher_bytes = 2.0 * models.count_parameters(models.build_empty(frozen))
        # the layer-wise objectives hold the teacher's streams at each block boundary
        if run.stage.type in ("distill", "fuse"):
            states = (depth + 1) * 2.0 * shape.tokens * width
    return StageMemory(
        stage=run.stage.name,
        type=run.stage.type,
        world=world,
        teacher=teacher_bytes,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        teacher_states=states,
        workspace=WORKSPACE_BYTES,
    )


def student_config(teacher: dict, runs: list[StageRun]) -> dict:
    """The pruned student's config: the teacher at the depth the pipeline prunes it to."""
    layers = lineage.final_student([r.stage for r in runs]).layers
    return {**teacher, "num_layers": layers} if layers is not None else dict(teacher)
