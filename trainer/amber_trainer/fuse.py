"""Hybrid-stream conversion (docs/design.md, "fuse"): dual-stream blocks -> single-stream.

`convert` turns the deepest blocks of a model into `AmberSingleStreamBlock`s initialised from
each block's image branch (text-branch weights are dropped). It is a pure model -> new model
function; progressive fusion calls it once per phase with a growing count.

With calibration inputs, each converted block's attention input projections (q, k, v) are
*fitted* instead of copied: a single block applies one projection to text and image tokens
alike, so the image branch's projection, copied, feeds the text tokens through weights
that never saw them, and the image tokens lose what they read from the prompt. The fit is
the least-squares projection (with bias) that reproduces the image branch's q, k, v on the
block's image tokens and the text branch's on its real text tokens, from the inputs the
single block will actually see (text normalised and modulated as the image is): the
covariance-weighted merge of the two branches (RegMean, Jin et al., ICLR 2023), solved
once, in closed form.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from amber_trainer import models
from amber_trainer.forward import Conditioning, FlowInputs, embed, run_block
from amber_trainer.hybrid import TEXT_BRANCH_PREFIXES, AmberHybridTransformer2DModel

FITTED = ("to_q", "to_k", "to_v")  # what the fit replaces: how image tokens read the text
TEXT_OF = {"to_q": "add_q_proj", "to_k": "add_k_proj", "to_v": "add_v_proj"}
RIDGE = 1e-3  # of the Gram matrix's mean diagonal: keeps unused directions at zero


def phases(single_layers: int, blocks_per_phase: int, already: int = 0) -> list[int]:
    """Single-stream counts after each phase, deepest blocks first: e.g. 5, 2 -> [2, 4, 5]."""
    counts = list(range(already + blocks_per_phase, single_layers, blocks_per_phase))
    return [*counts, single_layers] if single_layers > already else []


@torch.no_grad()
def convert(
    model: torch.nn.Module, single_layers: int, calibration: Iterable[FlowInputs] = ()
) -> AmberHybridTransformer2DModel:
    """A hybrid model whose deepest `single_layers` blocks are single-stream: each new one
    a copy of its dual block's image branch, its q, k, v fitted to both streams when
    `calibration` batches are given."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    total = config["num_layers"]
    already = config.get("num_single_layers", 0)
    if not already <= single_layers <= total:
        raise ValueError(
            f"single_layers={single_layers} must be between the model's current "
            f"{already} single-stream blocks and its {total} blocks"
        )
    first_single = total - single_layers
    hybrid = models.build_empty({**config, "num_single_layers": single_layers})
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("transformer_blocks."):
            index, local = name.removeprefix("transformer_blocks.").split(".", 1)
            if int(index) >= first_single and local.startswith(TEXT_BRANCH_PREFIXES):
                continue  # a converted block keeps only its image branch
        state[name] = tensor.clone()
    for index, (weight, bias) in fit_projections(model, first_single, calibration).items():
        for name, w, b in zip(FITTED, weight.chunk(3), bias.chunk(3), strict=True):
            prefix = f"transformer_blocks.{index}.attn.{name}"
            state[f"{prefix}.weight"], state[f"{prefix}.bias"] = w, b
    hybrid.load_state_dict(state, assign=True, strict=True)
    return hybrid.to(next(model.parameters()).device)


def _modulated(block, x: torch.Tensor, branch: str, temb: torch.Tensor, index=None):
    """A dual block's first norm and modulation of `x` with `branch`'s ("img"/"txt") weights:
    the input its attention projections see."""
    normed = getattr(block, f"{branch}_norm1")(x)
    mod1 = getattr(block, f"{branch}_mod")(temb).chunk(2, dim=-1)[0]
    return block._modulate(normed, mod1, index)[0]


def _projection_targets(block, img, txt, cond: Conditioning):
    """(inputs, targets) of the fit for one dual block, image tokens then real text tokens:
    inputs as the single block will see them, targets the dual block's own q, k, v."""
    attn = block.attn
    text_temb = cond.temb.chunk(2, dim=0)[0] if block.zero_cond_t else cond.temb
    image_in = _modulated(block, img, "img", cond.temb, cond.modulate_index)
    text_in = _modulated(block, txt, "txt", text_temb)  # what the text branch read
    shared_in = _modulated(block, txt, "img", text_temb)  # what the single block reads
    image_out = torch.cat([getattr(attn, n)(image_in) for n in FITTED], -1)
    text_out = torch.cat([getattr(attn, TEXT_OF[n])(text_in) for n in FITTED], -1)
    real = (
        cond.mask.reshape(-1).bool()
        if cond.mask is not None
        else torch.ones(shared_in.shape[:2], dtype=torch.bool, device=txt.device).reshape(-1)
    )
    width = image_in.shape[-1]
    inputs = torch.cat([image_in.reshape(-1, width), shared_in.reshape(-1, width)[real]])
    targets = torch.cat(
        [
            image_out.reshape(-1, image_out.shape[-1]),
            text_out.reshape(-1, image_out.shape[-1])[real],
        ]
    )
    return inputs, targets


@torch.no_grad()
def fit_projections(
    model: torch.nn.Module, first: int, calibration: Iterable[FlowInputs]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per dual block at index >= `first`: the fitted stacked [q; k; v] weight (3D, D) and
    bias (3D,), accumulated over the `calibration` batches (normal equations in float64,
    so any number of batches costs one Gram matrix per block)."""
    grams: dict[int, list[torch.Tensor]] = {}
    for x in calibration:
        img, txt, cond = embed(model, x)
        for i, block in enumerate(model.transformer_blocks):
            if i >= first and hasattr(block, "txt_mod"):  # a dual block being converted
                inputs, targets = _projection_targets(block, img, txt, cond)
                ones = inputs.new_ones(len(inputs), 1)
                inputs = torch.cat([inputs, ones], -1).double()
                gram, cross = inputs.T @ inputs, inputs.T @ targets.double()
                if i in grams:
                    grams[i][0] += gram
                    grams[i][1] += cross
                else:
                    grams[i] = [gram, cross]
            img, txt = run_block(block, img, txt, cond)
    fitted = {}
    for i, (gram, cross) in grams.items():
        gram = gram + RIDGE * gram.diagonal().mean() * torch.eye(
            len(gram), dtype=gram.dtype, device=gram.device
        )
        solution = torch.linalg.solve(gram, cross)  # (D + 1, 3D)
        dtype = model.transformer_blocks[i].attn.to_q.weight.dtype
        fitted[i] = (solution[:-1].T.to(dtype).contiguous(), solution[-1].to(dtype).contiguous())
    return fitted
