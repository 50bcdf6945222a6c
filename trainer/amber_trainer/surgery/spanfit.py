"""MLP refit (docs/design.md, "prune" and "fuse"): a block re-solved to do another's work.

A pruned student block starts as a copy of one block of its span, so it does one block's
work where the teacher did several; a fused block starts from a dual block's image branch
and now serves text tokens too. And from the first such block on, each reads streams its
reference never produced. `refit_block` re-solves the last linear layer of a block's MLPs
so that the block maps the streams the *new* model carries into it to the streams the
*reference* carries out of what it replaces (a span of teacher blocks, or the dual block
it was converted from): a least-squares fit in closed form, done block by block in order,
as ReplaceMe (Shopkhoev et al., 2025) replaces pruned spans by a linear map estimated on
calibration data and as layer-wise pruning calibrates on the pruned model's own
activations. Attention and modulation stay; only weights that enter the residual stream
linearly are solved for. A dual block has two MLPs (image and text rows); a single-stream
block one, fitted on image rows (`mlps`). The last block's text output is read by nothing:
a dual last block keeps its text MLP.

The MLP's output is scaled per channel by a gate that depends on the timestep (and, with
`zero_cond_t`, on the token's modulation index): output = h + g_c(t) (W a + b)_c. So each
output channel c is its own weighted problem. The normal equations are kept per (time, index)
key (Gram AᵀA and cross Aᵀr, float64), and channel c's system is Σ g_c² AᵀA w_c = Σ g_c Aᵀr_c:
memory of (keys x hidden²), never (channels x hidden²); the stages draw their calibration
rows at a few fixed times (`calibration`) to keep the keys few. One gate profile per
channel does not work: the benchmark teacher's gates are 13-47% away from any rank-1
profile over time, and a fit that assumed one made the pruned model worse than no fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from amber_trainer.model.forward import Conditioning, FlowInputs, embed, run_block
from amber_trainer.model.hybrid import AmberSingleStreamBlock

BRANCHES = ("img", "txt")
TIMES = tuple((i + 0.5) / 8 for i in range(8))  # calibration times, one per batch
RIDGE = 1e-3  # of each channel's mean Gram diagonal, towards the block's current weights
CHUNK = 2**27  # float64 entries of channel systems solved at once (1 GiB)


def calibration(train, count: int, seed: int, batch_size: int, device, dtype) -> list:
    """Batches (FlowInputs) for a fit: `count` training rows drawn from `seed`, dealt out
    over `TIMES`, one time per batch, noised from `seed`. Few distinct times keep the
    refit's normal equations few; any times are correct."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(train), generator=gen)[:count].tolist()
    out = []
    for k, t in enumerate(TIMES):
        mine = rows[k :: len(TIMES)]
        for start in range(0, len(mine), batch_size):
            batch = train.rows(mine[start : start + batch_size], device, dtype)
            noise = torch.randn(batch.latents.shape, generator=gen, dtype=batch.latents.dtype)
            times = torch.full((len(batch),), t, device=device)
            out.append(batch.noised(times, noise.to(device)))
    return out


def mlp_inputs(block, img: torch.Tensor, txt: torch.Tensor, cond: Conditioning) -> dict:
    """Per branch ("img", "txt"): (residual stream before the MLP, the MLP's last linear
    layer's input, the MLP's gate), so that the block's output stream is residual + gate *
    net[-1](input). The dual block's part follows `QwenImageTransformerBlock.forward`
    (diffusers 0.42); a test pins both kinds to their blocks."""
    if isinstance(block, AmberSingleStreamBlock):
        x, normed2, gate = block.attend(
            img, txt, cond.mask, cond.temb, cond.rotary, None, cond.modulate_index
        )
        hidden = _hidden(block.img_mlp, normed2)
        gate = gate.expand(x.shape)
        n = txt.shape[1]
        return {
            "img": (x[:, n:], hidden[:, n:], gate[:, n:]),
            "txt": (x[:, :n], hidden[:, :n], gate[:, :n]),
        }
    text_temb = cond.temb.chunk(2, dim=0)[0] if block.zero_cond_t else cond.temb
    img_mod1, img_mod2 = block.img_mod(cond.temb).chunk(2, dim=-1)
    txt_mod1, txt_mod2 = block.txt_mod(text_temb).chunk(2, dim=-1)
    img_in, img_gate1 = block._modulate(block.img_norm1(img), img_mod1, cond.modulate_index)
    txt_in, txt_gate1 = block._modulate(block.txt_norm1(txt), txt_mod1)
    img_attn, txt_attn = block.attn(
        hidden_states=img_in,
        encoder_hidden_states=txt_in,
        encoder_hidden_states_mask=cond.mask,
        image_rotary_emb=cond.rotary,
    )
    img = img + img_gate1 * img_attn
    txt = txt + txt_gate1 * txt_attn
    img_in2, img_gate2 = block._modulate(block.img_norm2(img), img_mod2, cond.modulate_index)
    txt_in2, txt_gate2 = block._modulate(block.txt_norm2(txt), txt_mod2)
    return {
        "img": (img, _hidden(block.img_mlp, img_in2), img_gate2.expand(img.shape)),
        "txt": (txt, _hidden(block.txt_mlp, txt_in2), txt_gate2.expand(txt.shape)),
    }


def _hidden(mlp, x: torch.Tensor) -> torch.Tensor:
    """A diffusers FeedForward's input to its last linear layer."""
    for layer in mlp.net[:-1]:
        x = layer(x)
    return x


def mlps(block, last: bool = False) -> dict[str, tuple[str, ...]]:
    """The block's MLPs to refit, by attribute name, and the branches whose rows fit each.
    A single-stream block's one MLP is fitted on image rows only: fitted on both, the text
    rows pulled it so far from what the image tokens need that the benchmark's converted
    model was three times further from the unfused one, on the calibration rows too."""
    if isinstance(block, AmberSingleStreamBlock):
        return {"img_mlp": ("img",)}
    return {"img_mlp": ("img",), **({} if last else {"txt_mlp": ("txt",)})}


class NormalEquations:
    """Per (time, index) key: the Gram AᵀA (n+1, n+1), the cross Aᵀr (n+1, D) and the
    gate (D,) of one linear layer's fit, accumulated over calibration batches on the host
    (at full width eight Grams of an MLP are 10 GB), solved on the layer's device."""

    def __init__(self):
        self.terms: dict[tuple, list[torch.Tensor]] = {}

    def add(self, key: tuple, inputs: torch.Tensor, targets: torch.Tensor, gate: torch.Tensor):
        x = torch.cat([inputs, inputs.new_ones(len(inputs), 1)], -1).double()
        gram, cross, gate = (t.cpu() for t in (x.T @ x, x.T @ targets.double(), gate))
        if key in self.terms:
            self.terms[key][0] += gram
            self.terms[key][1] += cross
        else:
            self.terms[key] = [gram, cross, gate.double()]

    def solve(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (D, n) and bias (D,) minimising Σ_key ||g ⊙ ([a, 1] M) - r||², channel by
        channel, with a ridge towards the current `weight` and `bias`: directions the
        calibration rows never excite keep the block's weights instead of going to 0."""
        device = weight.device
        prior = torch.cat([weight, bias[:, None]], -1).double()  # (D, n+1)
        grams = torch.stack([t[0] for t in self.terms.values()]).to(device)  # (K, n+1, n+1)
        crosses = torch.stack([t[1] for t in self.terms.values()]).to(device)  # (K, n+1, D)
        gates = torch.stack([t[2] for t in self.terms.values()]).to(device)  # (K, D)
        size, channels = grams.shape[-1], gates.shape[-1]
        eye = torch.eye(size, dtype=grams.dtype, device=grams.device)
        step = max(1, CHUNK // size**2)
        rows = []
        for c in range(0, channels, step):
            g = gates[:, c : c + step]  # (K, C)
            system = torch.einsum("kc,kij->cij", g**2, grams)
            ridge = RIDGE * system.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
            rhs = torch.einsum("kc,kic->ci", g, crosses[:, :, c : c + step])
            rhs = rhs + ridge[:, None] * prior[c : c + step]
            # Cholesky: the systems are positive definite, and batched LU solves fail on
            # some multi-threaded CPU builds of torch.
            factor = torch.linalg.cholesky(system + ridge[:, None, None] * eye)
            rows.append(torch.cholesky_solve(rhs[..., None], factor)[..., 0])
        solution = torch.cat(rows)  # (D, n+1)
        return solution[:, :-1], solution[:, -1]


def _rows(branch: str, parts: dict, target: torch.Tensor, cond: Conditioning, times):
    """(key, inputs, what gate * net[-1](inputs) has to add, gate) of one branch for one
    batch, per (time, modulation index) key: every image token, the real text tokens."""
    residual, hidden, gate = parts[branch]
    want = target - residual
    tokens = torch.ones(want.shape[:2], dtype=torch.bool, device=want.device)
    if branch == "txt" and cond.mask is not None:
        tokens = cond.mask.bool()
    index = torch.zeros_like(tokens, dtype=torch.int)
    if branch == "img" and cond.modulate_index is not None:
        index = cond.modulate_index
    for time in times.unique().tolist():
        same = (times == time)[:, None] & tokens
        for i in index[same].unique().tolist():
            pick = same & (index == i)
            if pick.any():
                yield (time, i), hidden[pick], want[pick], gate[pick][0]


@torch.no_grad()
def refit_block(block, batches: Sequence, last: bool = False) -> None:
    """Refit `block`'s MLP output layers in place from `batches` of (times (B,),
    conditioning, streams entering the block, streams it should produce), each (img, txt)."""
    device = next(block.parameters()).device
    layers = mlps(block, last)
    normal = {name: NormalEquations() for name in layers}
    for times, cond, seen, target in batches:
        seen = tuple(s.to(device) for s in seen)
        parts = mlp_inputs(block, *seen, cond)
        for name, branches in layers.items():
            for branch in branches:
                wanted = target[BRANCHES.index(branch)].to(device)
                for key, h, w, g in _rows(branch, parts, wanted, cond, times.to(device)):
                    normal[name].add(key, h, w, g)
    for name, equations in normal.items():
        layer = getattr(block, name).net[-1]
        weight, bias = equations.solve(layer.weight, layer.bias)
        layer.weight.copy_(weight.to(layer.weight.dtype))
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _error(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    return float((ours - theirs).pow(2).sum()), float(theirs.pow(2).sum())


@contextmanager
def on_device(modules: Sequence[torch.nn.Module], device: torch.device):
    """`modules` moved to `device` for the block, then back where each was: a full-size
    model waits on the host and only the blocks in use occupy the accelerator."""
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    try:
        yield [m.to(device) for m in modules]
    finally:
        for module, home in zip(modules, homes, strict=True):
            module.to(home)


@torch.no_grad()
def refit(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    spans: Sequence[tuple[int, int]],
    calibration: Sequence[FlowInputs],
    device: torch.device | None = None,
    on_block=None,
) -> list[tuple[float, float]]:
    """Refit each block of a pruned `student` in place, in order, to map its own incoming
    streams to the teacher's streams after its span (`spans[j]` = first and last teacher
    block of student block j). Returns per student block the relative error of its image
    stream against the teacher's on the calibration rows, before and after its refit;
    `on_block(j)` is called after each block (a progress bar).

    The computation runs on `device` (default: the teacher's), one block at a time: both
    models may stay on the host (a 20B teacher in float32 is 80 GB), and each block visits
    the device once, with every calibration batch; the streams wait on the host."""
    device = device or next(teacher.parameters()).device
    shell = [m for name, m in teacher.named_children() if name != "transformer_blocks"]
    streams = []  # per batch: times, conditioning, teacher's (img, txt), student's (img, txt)
    with on_device(shell, device):
        for x in calibration:
            img, txt, cond = embed(teacher, x)
            streams.append([x.timestep, cond, (img.cpu(), txt.cpu()), (img.cpu(), txt.cpu())])

    def on(pair):
        return tuple(s.to(device) for s in pair)

    blocks = teacher.transformer_blocks
    errors = []
    for j, (first, last) in enumerate(spans):
        for k in range(first, last + 1):
            with on_device([blocks[k]], device):
                for entry in streams:
                    entry[2] = tuple(s.cpu() for s in run_block(blocks[k], *on(entry[2]), entry[1]))
        with on_device([student.transformer_blocks[j]], device) as (block,):
            before = [0.0, 0.0]
            for _, cond, own, seen in streams:
                out = run_block(block, *on(seen), cond)
                before = [
                    a + b for a, b in zip(before, _error(out[0], own[0].to(device)), strict=True)
                ]
            batches = [(t, c, seen, own) for t, c, own, seen in streams]
            refit_block(block, batches, j == len(spans) - 1)
            after = 0.0
            for entry in streams:
                seen = run_block(block, *on(entry[3]), entry[1])
                after += _error(seen[0], entry[2][0].to(device))[0]
                entry[3] = tuple(s.cpu() for s in seen)
        power = max(before[1], 1e-30)
        errors.append(((before[0] / power) ** 0.5, (after / power) ** 0.5))
        if on_block is not None:
            on_block(j)
    return errors
