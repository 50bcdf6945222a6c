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

`sequential` fits each converted block on the inputs it sees in the converted model (the
blocks before it already converted and fitted), block by block, as layer-wise pruning
calibrates on the pruned model's own activations: from the first converted block on, the
text tokens are updated with image-branch weights, so the text stream the next block reads
drifts away from the dual model's, and a fit on the dual model's inputs is a fit to
tokens the hybrid never produces. Its text targets are also the q and k the dual block
attends with: a single block normalises them with the image branch's RMSNorm weights, so
the targets are scaled by the ratio of the text branch's weights to the image branch's.

With `text_rank` r > 0 the converted blocks keep a rank-r text correction of q, k, v
(`hybrid.AmberSingleStreamBlock`): the image tokens keep the image branch's projections
exactly, and the correction is the reduced-rank regression of what the text branch computed
minus what the shared projections give on the same text inputs: the least-squares map,
projected on the r output directions that carry most of its fitted values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from amber_trainer.model import models
from amber_trainer.model.forward import Conditioning, FlowInputs, embed, run_block
from amber_trainer.model.hybrid import TEXT_BRANCH_PREFIXES, AmberHybridTransformer2DModel
from amber_trainer.surgery import spanfit

FITTED = ("to_q", "to_k", "to_v")  # what the fit replaces: how image tokens read the text
TEXT_OF = {"to_q": "add_q_proj", "to_k": "add_k_proj", "to_v": "add_v_proj"}
RIDGE = 1e-3  # of the Gram matrix's mean diagonal: keeps unused directions at zero


def phases(single_layers: int, blocks_per_phase: int, already: int = 0) -> list[int]:
    """Single-stream counts after each phase, deepest blocks first: e.g. 5, 2 -> [2, 4, 5]."""
    counts = list(range(already + blocks_per_phase, single_layers, blocks_per_phase))
    return [*counts, single_layers] if single_layers > already else []


def text_rank(width: int, fraction: float) -> int:
    """The text correction's rank: `fraction` of the model's `width` (0 when 0)."""
    return max(1, round(fraction * width)) if fraction > 0 else 0


def fused_config(config: dict, stage) -> dict:
    """The config of the model a fuse `stage` makes from a model of `config`."""
    width = models.build_empty(config).inner_dim
    rank = text_rank(width, stage.text_rank_fraction)
    return {**config, "num_single_layers": stage.single_layers, "single_text_rank": rank}


@torch.no_grad()
def convert(
    model: torch.nn.Module,
    single_layers: int,
    calibration: Iterable[FlowInputs] = (),
    sequential: bool = False,
    text_rank: int = 0,
    refit_mlp: bool = False,
) -> AmberHybridTransformer2DModel:
    """A hybrid model whose deepest `single_layers` blocks are single-stream: each new one
    a copy of its dual block's image branch, its q, k, v fitted to both streams when
    `calibration` batches are given (on the hybrid's own inputs when `sequential`), or,
    with `text_rank` > 0, its rank-`text_rank` text correction fitted (zero without
    calibration: text tokens start on the image branch's projections); with `refit_mlp`
    (sequential only) each converted block's MLP output layer refitted after them."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    total = config["num_layers"]
    already = config.get("num_single_layers", 0)
    if not already <= single_layers <= total:
        raise ValueError(
            f"single_layers={single_layers} must be between the model's current "
            f"{already} single-stream blocks and its {total} blocks"
        )
    first_single = total - single_layers
    rank = config.get("single_text_rank", 0)
    if already and text_rank != rank:
        raise ValueError(f"text_rank={text_rank}: the model's single blocks have rank {rank}")
    if text_rank > (width := model.inner_dim):
        raise ValueError(f"text_rank={text_rank} exceeds the model's width {width}")
    config = {**config, "num_single_layers": single_layers, "single_text_rank": text_rank}
    hybrid = models.build_empty(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("transformer_blocks."):
            index, local = name.removeprefix("transformer_blocks.").split(".", 1)
            if int(index) >= first_single and local.startswith(TEXT_BRANCH_PREFIXES):
                continue  # a converted block keeps only its image branch
        state[name] = tensor.clone()
    if text_rank:
        for index in range(first_single, total - already):
            state.update(_text_state(index, *_zero_correction(width, text_rank)))
    if refit_mlp and not sequential:
        raise ValueError("refit_mlp needs the sequential fit (the hybrid's own streams)")
    if not sequential:
        fits = fit_projections(model, first_single, calibration, text_rank)
        for index, gram, cross in fits:
            state.update(_fitted_state(index, model, gram, cross, text_rank))
    hybrid.load_state_dict(state, assign=True, strict=True)
    hybrid = hybrid.to(next(model.parameters()).device)
    if sequential:
        fit_sequential(model, hybrid, first_single, calibration, text_rank, refit_mlp)
    return hybrid


def _projection_state(index: int, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """The state-dict entries of block `index`'s fitted q, k, v."""
    state = {}
    for name, w, b in zip(FITTED, weight.chunk(3), bias.chunk(3), strict=True):
        prefix = f"transformer_blocks.{index}.attn.{name}"
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = w, b
    return state


def _text_state(index: int, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> dict:
    """The state-dict entries of block `index`'s text correction."""
    prefix = f"transformer_blocks.{index}"
    return {
        f"{prefix}.text_down.weight": down,
        f"{prefix}.text_up.weight": up,
        f"{prefix}.text_up.bias": bias,
    }


def _zero_correction(width: int, rank: int):
    return torch.zeros(rank, width), torch.zeros(3 * width, rank), torch.zeros(3 * width)


def _fitted_state(index: int, model, gram, cross, text_rank: int) -> dict:
    """Block `index`'s fitted entries from its accumulated normal equations."""
    dtype = model.transformer_blocks[index].attn.to_q.weight.dtype
    if text_rank:
        return _text_state(index, *_solve_low_rank(gram, cross, text_rank, dtype))
    return _projection_state(index, *_solve(gram, cross, dtype))


def _fit_rows(block, image: tuple, text: tuple, text_rank: int):
    """(inputs, targets) of one batch in a block's fit: both streams for the shared
    projections; with a text correction, the text rows and what the image branch's
    projections leave of their targets."""
    if text_rank:
        attn = block.attn
        shared = torch.cat([getattr(attn, n)(text[0]) for n in FITTED], -1)
        return text[0], text[1] - shared
    return torch.cat([image[0], text[0]]), torch.cat([image[1], text[1]])


def _modulated(block, x: torch.Tensor, branch: str, temb: torch.Tensor, index=None):
    """A dual block's first norm and modulation of `x` with `branch`'s ("img"/"txt") weights:
    the input its attention projections see."""
    normed = getattr(block, f"{branch}_norm1")(x)
    mod1 = getattr(block, f"{branch}_mod")(temb).chunk(2, dim=-1)[0]
    return block._modulate(normed, mod1, index)[0]


def _norm_ratio(attn) -> torch.Tensor | None:
    """Per output channel of [q; k; v]: the text branch's q/k RMSNorm weight over the image
    branch's (1 for v). A single block's text q = ratio * the text branch's q leaves, after
    the image branch's RMSNorm, the direction the dual block attended with in every head."""
    if attn.norm_q is None or attn.norm_added_q is None or attn.norm_q.weight is None:
        return None
    parts = []
    for image, text in ((attn.norm_q, attn.norm_added_q), (attn.norm_k, attn.norm_added_k)):
        safe = image.weight.abs() > 1e-3
        ratio = torch.where(safe, text.weight / torch.where(safe, image.weight, 1.0), 1.0)
        parts.append(ratio.repeat(attn.heads))
    parts.append(torch.ones_like(parts[0]))
    return torch.cat(parts)


def _projection_targets(block, img, txt, cond: Conditioning, seen=None, fold=False):
    """(inputs, targets) rows of the fit for one dual block, of the image tokens and of the
    real text tokens: targets the dual block's own q, k, v on its streams `img`, `txt`;
    inputs as the single block will see them, from the streams `seen` (default: the same),
    `fold`: text q, k scaled for the single block's RMSNorm (`_norm_ratio`)."""
    attn = block.attn
    text_temb = cond.temb.chunk(2, dim=0)[0] if block.zero_cond_t else cond.temb
    image_read = _modulated(block, img, "img", cond.temb, cond.modulate_index)
    text_in = _modulated(block, txt, "txt", text_temb)  # what the text branch read
    seen_img, seen_txt = seen or (img, txt)
    image_in = (
        image_read
        if seen is None
        else _modulated(block, seen_img, "img", cond.temb, cond.modulate_index)
    )
    shared_in = _modulated(block, seen_txt, "img", text_temb)  # what the single block reads
    image_out = torch.cat([getattr(attn, n)(image_read) for n in FITTED], -1)
    text_out = torch.cat([getattr(attn, TEXT_OF[n])(text_in) for n in FITTED], -1)
    ratio = _norm_ratio(attn) if fold else None
    if ratio is not None:
        text_out = text_out * ratio.to(text_out.dtype)
    real = (
        cond.mask.reshape(-1).bool()
        if cond.mask is not None
        else torch.ones(shared_in.shape[:2], dtype=torch.bool, device=txt.device).reshape(-1)
    )
    width, out = image_in.shape[-1], image_out.shape[-1]
    image = (image_in.reshape(-1, width), image_out.reshape(-1, out))
    return image, (shared_in.reshape(-1, width)[real], text_out.reshape(-1, out)[real])


@torch.no_grad()
def fit_projections(
    model: torch.nn.Module, first: int, calibration: Iterable[FlowInputs], text_rank: int = 0
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per dual block at index >= `first`: its normal equations (XᵀX, XᵀY) accumulated over
    the `calibration` batches (in float64, so any number of batches costs one Gram matrix
    per block) for the shared projections, or with `text_rank` > 0 the text correction."""
    grams: dict[int, list[torch.Tensor]] = {}
    for x in calibration:
        img, txt, cond = embed(model, x)
        for i, block in enumerate(model.transformer_blocks):
            if i >= first and hasattr(block, "txt_mod"):  # a dual block being converted
                parts = _projection_targets(block, img, txt, cond)
                gram, cross = _normal_equations(*_fit_rows(block, *parts, text_rank))
                if i in grams:
                    grams[i][0] += gram
                    grams[i][1] += cross
                else:
                    grams[i] = [gram, cross]
            img, txt = run_block(block, img, txt, cond)
    return [(i, gram, cross) for i, (gram, cross) in grams.items()]


@torch.no_grad()
def fit_sequential(
    model: torch.nn.Module,
    hybrid: AmberHybridTransformer2DModel,
    first: int,
    calibration: Iterable[FlowInputs],
    text_rank: int = 0,
    refit_mlp: bool = False,
) -> None:
    """Fit `hybrid`'s converted blocks (index >= `first`) in place, in order: each on the
    streams the hybrid itself carries into it, against what `model`'s dual block computed
    on its own streams (`_projection_targets` with `seen` and `fold`); their shared
    projections, or with `text_rank` > 0 their text correction; then, with `refit_mlp`,
    their MLP output layer (`spanfit.refit_block`) to the dual block's output streams.
    The calibration streams of both models are kept on the CPU between blocks."""
    device = next(model.parameters()).device
    streams = []  # per batch: (model's img, txt), (hybrid's img, txt), conditioning, times
    for x in calibration:
        img, txt, cond = embed(model, x)
        streams.append([(img.cpu(), txt.cpu()), (img.cpu(), txt.cpu()), cond, x.timestep])
    pairs = list(zip(model.transformer_blocks, hybrid.transformer_blocks, strict=True))
    for i, (block, new) in enumerate(pairs):
        converted = i >= first and hasattr(block, "txt_mod")  # a dual block being converted
        if converted:
            gram = cross = None
            for own, seen, cond, _ in streams:
                own = tuple(t.to(device) for t in own)
                seen = tuple(t.to(device) for t in seen)
                parts = _projection_targets(block, *own, cond, seen, fold=True)
                g, c = _normal_equations(*_fit_rows(block, *parts, text_rank))
                gram, cross = (g, c) if gram is None else (gram + g, cross + c)
            if gram is not None:
                fitted = _fitted_state(i, model, gram, cross, text_rank)
                hybrid.load_state_dict(fitted, strict=False)
        for entry in streams:
            own, _, cond, _ = entry
            own = run_block(block, *(t.to(device) for t in own), cond)
            entry[0] = tuple(t.cpu() for t in own)
        if converted and refit_mlp:  # against the dual block's output on its own streams
            batches = [(times, cond, seen, own) for own, seen, cond, times in streams]
            spanfit.refit_block(new, batches, last=i == len(pairs) - 1)
        for entry in streams:
            seen = run_block(new, *(t.to(device) for t in entry[1]), entry[2])
            entry[1] = tuple(t.cpu() for t in seen)


def _normal_equations(inputs: torch.Tensor, targets: torch.Tensor):
    """One batch's terms of the least-squares fit of `targets` from `inputs` and a bias,
    in float64: (XᵀX, XᵀY) with X = [inputs, 1]."""
    inputs = torch.cat([inputs, inputs.new_ones(len(inputs), 1)], -1).double()
    return inputs.T @ inputs, inputs.T @ targets.double()


def _least_squares(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The ridge least-squares solution of accumulated normal equations, (D + 1, 3D)."""
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + RIDGE * gram.diagonal().mean() * eye, cross)


def _solve(gram: torch.Tensor, cross: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked [q; k; v] weight (3D, D) and bias (3D,) that solve the normal equations."""
    solution = _least_squares(gram, cross)
    return solution[:-1].T.to(dtype).contiguous(), solution[-1].to(dtype).contiguous()


def _solve_low_rank(gram: torch.Tensor, cross: torch.Tensor, rank: int, dtype):
    """The rank-`rank` least-squares map (reduced-rank regression): the full solution M
    projected on the top eigenvectors V of its fitted values' Gram matrix MᵀXᵀXM, so
    x -> ([x, 1] M V) Vᵀ: `text_down` = (M_x V)ᵀ (r, D), `text_up` = V (3D, r) with bias
    V Vᵀ m_1 (3D,)."""
    solution = _least_squares(gram, cross)
    fitted = solution.T @ gram @ solution  # (3D, 3D)
    basis = torch.linalg.eigh(fitted).eigenvectors[:, -rank:]  # the largest eigenvalues
    down = (solution[:-1] @ basis).T
    bias = basis @ (basis.T @ solution[-1])
    return (t.to(dtype).contiguous() for t in (down, basis, bias))
