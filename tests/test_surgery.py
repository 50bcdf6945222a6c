"""Model surgery on tiny configs: the semantics of score, prune and fuse pinned down."""

from __future__ import annotations

import pytest
import torch

from amber.stages import ScoreStage
from amber_trainer import data
from amber_trainer.model import forward, models
from amber_trainer.model.forward import diffusers_forward
from amber_trainer.model.hybrid import AmberHybridTransformer2DModel, AmberSingleStreamBlock
from amber_trainer.surgery import fuse, prune, score, spanfit
from amber_trainer.train import loop

TINY = models.named_config("tiny")
TEXT_TO_IMAGE = {
    "txt_mod": "img_mod",
    "txt_mlp": "img_mlp",
    "attn.add_q_proj": "attn.to_q",
    "attn.add_k_proj": "attn.to_k",
    "attn.add_v_proj": "attn.to_v",
    "attn.to_add_out": "attn.to_out.0",
    "attn.norm_added_q": "attn.norm_q",
    "attn.norm_added_k": "attn.norm_k",
}


def tie_branches(blocks):
    """Text-branch weights set equal to the image branch's: one projection serves both."""
    for block in blocks:
        for text, image in TEXT_TO_IMAGE.items():
            block.get_submodule(text).load_state_dict(block.get_submodule(image).state_dict())


@pytest.fixture(scope="module")
def teacher():
    return models.build(TINY, seed=0).eval()


@pytest.fixture(scope="module")
def batches():
    return data.synthetic(TINY, samples=6, batch_size=3, seed=1)


def inputs(batch, t=0.5, seed=0):
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(seed))
    return batch.noised(torch.full((len(batch),), t), noise)


def make_identity(block):
    """Zero modulation: every gate is 0, so the block adds nothing to either stream."""
    with torch.no_grad():
        for mod in (block.img_mod[1], block.txt_mod[1]):
            mod.weight.zero_()
            mod.bias.zero_()


@torch.no_grad()
def test_split_forward_equals_diffusers_forward(teacher, batches):
    x = inputs(batches[0])
    assert torch.equal(forward.velocity(teacher, x), diffusers_forward(teacher, x))


@pytest.mark.parametrize("init", ["keep", "average", "importance-weighted"])
@torch.no_grad()
def test_keeping_every_layer_reproduces_the_teacher(teacher, batches, init):
    entries = prune.layer_map(range(12), 12, init, importance=[1.0] * 12)
    student = prune.prune(teacher, entries)
    assert isinstance(student, type(teacher)) and student.config.num_layers == 12
    x = inputs(batches[0])
    assert torch.equal(diffusers_forward(student, x), diffusers_forward(teacher, x))


@torch.no_grad()
def test_skipping_an_identity_block_changes_nothing(batches):
    model = models.build(TINY, seed=3).eval()
    make_identity(model.transformer_blocks[4])
    x = inputs(batches[0])
    assert torch.equal(forward.velocity(model, x, skip=[4]), forward.velocity(model, x))
    for criterion in ("importance", "total-effect"):
        matrix = score.MATRICES[criterion](model, batches, [0.2, 0.8])
        assert torch.all(matrix[4] == 0)
        assert torch.all(matrix[[i for i in range(12) if i != 4]] > 0)
        for selection in ("spans", "top"):
            params = ScoreStage(
                target_layers=11,
                criterion=criterion,
                selection=selection,
                keep_first=0,
                keep_last=0,
            )
            kept = score.score(model, batches, params)
            assert kept.keep == [i for i in range(12) if i != 4], (criterion, selection)


def test_nearest_assignment_and_spans():
    groups = prune.assign([0, 3, 9, 11], 12)
    # 1 -> 0; 2 -> 3; 6 is 3 away from both 3 and 9: the tie goes to the preceding block.
    assert groups == {0: [0, 1], 3: [2, 3, 4, 5, 6], 9: [7, 8, 9, 10], 11: [11]}
    entries = prune.layer_map([2, 7], 10, "average")
    assert [e.span for e in entries] == [(0, 4), (5, 9)]  # spans tile the teacher
    assert entries[0].sources == [0, 1, 2, 3, 4] and entries[0].weights == [0.2] * 5
    weighted = prune.layer_map([2, 7], 10, "importance-weighted", importance=[0, 0, 1, 3, 0] * 2)
    assert weighted[0].weights == [0, 0, 0.25, 0.75, 0]
    with pytest.raises(ValueError):
        prune.assign([3, 12], 12)


@torch.no_grad()
def test_averaging_is_the_weighted_mean_of_the_span(teacher):
    entries = prune.layer_map([1, 5], 12, "average")
    student = prune.prune(teacher, entries)
    name = "img_mlp.net.2.weight"
    expected = torch.stack(
        [teacher.transformer_blocks[s].state_dict()[name] for s in entries[1].sources]
    ).mean(0)
    torch.testing.assert_close(student.transformer_blocks[1].state_dict()[name], expected)
    keep = prune.prune(teacher, prune.layer_map([1, 5], 12, "keep"))
    assert torch.equal(
        keep.transformer_blocks[1].state_dict()[name],
        teacher.transformer_blocks[5].state_dict()[name],
    )
    # Non-block weights (embedders, output head) come over untouched.
    assert torch.equal(student.proj_out.weight, teacher.proj_out.weight)


@torch.no_grad()
def test_fused_block_equals_dual_block_with_tied_branches(batches):
    model = models.build(TINY, seed=5).eval()
    tie_branches(model.transformer_blocks[-3:])
    hybrid = fuse.convert(model, 3)
    assert models.block_kinds(hybrid) == ["dual"] * 9 + ["single"] * 3
    x = inputs(batches[1], t=0.3)
    torch.testing.assert_close(
        diffusers_forward(hybrid, x), diffusers_forward(model, x), rtol=0, atol=1e-6
    )


@torch.no_grad()
def test_fuse_drops_text_weights_and_keeps_the_rest(teacher, batches):
    hybrid = fuse.convert(teacher, 4)
    single = hybrid.transformer_blocks[-1]
    assert isinstance(single, AmberSingleStreamBlock)
    assert not any("txt" in n or "add_" in n for n, _ in single.named_parameters())
    assert torch.equal(
        single.img_mlp.net[2].weight, teacher.transformer_blocks[-1].img_mlp.net[2].weight
    )
    assert torch.equal(
        hybrid.transformer_blocks[0].txt_mod[1].weight,
        teacher.transformer_blocks[0].txt_mod[1].weight,
    )
    # Untied text weights: the output moves, but stays finite and the right shape.
    out = diffusers_forward(hybrid, inputs(batches[0]))
    assert out.shape == batches[0].latents.shape and torch.isfinite(out).all()
    # Progressive: converting more of an already-hybrid model keeps earlier conversions.
    more = fuse.convert(hybrid, 6)
    assert models.block_kinds(more).count("single") == 6
    assert torch.equal(more.transformer_blocks[-1].img_mod[1].weight, single.img_mod[1].weight)
    with pytest.raises(ValueError):
        fuse.convert(more, 2)


@torch.no_grad()
def test_fitted_conversion_reproduces_tied_branches(batches):
    # With tied branches one projection serves both streams exactly: the fit must find it.
    model = models.build(TINY, seed=5).eval()
    tie_branches(model.transformer_blocks[-3:])
    calibration = [inputs(b, t=t, seed=7) for b in batches for t in (0.1, 0.5, 0.9)]
    fitted = fuse.convert(model, 3, calibration)
    x = inputs(batches[1], t=0.4, seed=9)
    torch.testing.assert_close(
        diffusers_forward(fitted, x), diffusers_forward(model, x), rtol=0, atol=5e-3
    )


@torch.no_grad()
def test_fitted_projections_beat_the_image_branch_on_both_streams(teacher, batches):
    # Untied branches: on held-out tokens the fitted q, k, v are closer to what the dual
    # block computed (image branch on image tokens, text branch on text tokens) than the
    # copied image branch is.
    rows = data.synthetic(TINY, samples=24, batch_size=6, seed=11)
    calibration = [inputs(b, t=t, seed=i) for i, b in enumerate(rows) for t in (0.2, 0.5, 0.8)]
    fitted = fuse.convert(teacher, 4, calibration)
    copied = fuse.convert(teacher, 4)
    held = inputs(batches[1], t=0.5, seed=3)
    img, txt, cond = forward.embed(teacher, held)
    for i, block in enumerate(teacher.transformer_blocks):
        if i >= 8:
            x, y = fuse._fit_rows(block, *fuse._projection_targets(block, img, txt, cond), 0)
            errors = []
            for hybrid in (fitted, copied):
                attn = hybrid.transformer_blocks[i].attn
                pred = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1)
                errors.append((pred - y).pow(2).mean().item())
            assert errors[0] < 0.9 * errors[1], (i, errors)
        img, txt = forward.run_block(block, img, txt, cond)


@torch.no_grad()
def test_sequential_fit_reproduces_tied_branches(batches):
    # Tied branches: the converted model is the dual one, so fitting on its own inputs
    # must find the shared projection too.
    model = models.build(TINY, seed=5).eval()
    tie_branches(model.transformer_blocks[-3:])
    calibration = [inputs(b, t=t, seed=7) for b in batches for t in (0.1, 0.5, 0.9)]
    fitted = fuse.convert(model, 3, calibration, sequential=True)
    x = inputs(batches[1], t=0.4, seed=9)
    torch.testing.assert_close(
        diffusers_forward(fitted, x), diffusers_forward(model, x), rtol=0, atol=5e-3
    )


def _normalised_heads(norm, projected, heads):
    return torch.nn.functional.normalize(norm(projected.unflatten(-1, (heads, -1))), dim=-1)


@torch.no_grad()
def test_sequential_fit_keeps_the_text_branch_attention_directions(batches):
    # Tied projections but the text branch's q/k RMSNorm weights differ: after the single
    # block's (image-branch) norm, its text queries and keys point nearer where the dual
    # block's did in every head than the plain fit's.
    model = models.build(TINY, seed=5).eval()
    tie_branches(model.transformer_blocks[-2:])
    dual = model.transformer_blocks[-1]
    gen = torch.Generator().manual_seed(0)
    for norm in (dual.attn.norm_added_q, dual.attn.norm_added_k):
        norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=gen))
    calibration = [inputs(b, t=t, seed=7) for b in batches for t in (0.2, 0.5, 0.8)]
    fitted = fuse.convert(model, 2, calibration, sequential=True)
    plain = fuse.convert(model, 2, calibration)
    img, txt, cond = forward.embed(model, inputs(batches[1], t=0.5, seed=3))
    img, txt = forward.run_blocks(model.transformer_blocks[:-1], img, txt, cond)
    text_in = fuse._modulated(dual, txt, "txt", cond.temb)
    heads = dual.attn.heads
    for proj, norm, single_norm, name in (
        ("add_q_proj", "norm_added_q", "norm_q", "to_q"),
        ("add_k_proj", "norm_added_k", "norm_k", "to_k"),
    ):
        want = _normalised_heads(getattr(dual.attn, norm), getattr(dual.attn, proj)(text_in), heads)
        cosines = []
        for hybrid in (fitted, plain):
            attn = hybrid.transformer_blocks[-1].attn
            got = _normalised_heads(getattr(attn, single_norm), getattr(attn, name)(text_in), heads)
            cosines.append((got * want).sum(-1).min().item())
        # One projection serves image and text tokens: a compromise, nearer the dual's.
        assert cosines[0] > cosines[1] + 0.02, (name, cosines)
        # The scaling itself is exact: the text branch's q or k times the ratio, normalised
        # by the image branch's RMSNorm, has the dual block's direction in every head.
        ratio = fuse._norm_ratio(dual.attn).chunk(3)[0 if name == "to_q" else 1]
        scaled = getattr(dual.attn, proj)(text_in) * ratio
        got = _normalised_heads(getattr(dual.attn, single_norm), scaled, heads)
        assert (got * want).sum(-1).min() > 0.9999


@torch.no_grad()
def test_sequential_fit_is_closer_on_the_hybrids_own_streams(teacher):
    # Untied branches: on held-out inputs, each converted block's q, k, v computed on the
    # streams its hybrid carries into it are closer to the dual block's own than the plain
    # fit's (fitted on the dual model's streams) are.
    rows = data.synthetic(TINY, samples=24, batch_size=6, seed=11)
    calibration = [inputs(b, t=t, seed=i) for i, b in enumerate(rows) for t in (0.2, 0.5, 0.8)]
    hybrids = [fuse.convert(teacher, 4, calibration, sequential=s) for s in (True, False)]
    held = inputs(data.synthetic(TINY, samples=6, batch_size=6, seed=12)[0], t=0.5, seed=3)
    errors = []
    for hybrid in hybrids:
        own = forward.embed(teacher, held)
        seen = own[:2]
        total = 0.0
        for i, (block, new) in enumerate(
            zip(teacher.transformer_blocks, hybrid.transformer_blocks, strict=True)
        ):
            if i >= 8:
                parts = fuse._projection_targets(block, *own, seen, fold=True)
                x, y = fuse._fit_rows(block, *parts, 0)
                attn = new.attn
                pred = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1)
                total += (pred - y).pow(2).mean().item()
            own = (*forward.run_block(block, *own[:2], own[2]), own[2])
            seen = forward.run_block(new, *seen, own[2])
        errors.append(total)
    # A random tiny model's text stream drifts little: closer, by a little (1% here).
    assert errors[0] < errors[1], errors


def test_low_rank_solve_is_the_reduced_rank_regression():
    # The rank-r map from the normal equations equals the brute force: the least-squares
    # fitted values projected on their top r right singular vectors; error falls with r.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen)
    y = x @ torch.randn(6, 9, generator=gen) + 1.0 + 0.3 * torch.randn(400, 9, generator=gen)
    gram, cross = fuse._normal_equations(x, y)
    weight, bias = fuse._solve(gram, cross, torch.float64)
    fitted = x.double() @ weight.T + bias
    errors = []
    for rank in (1, 3, 7):
        down, up, up_bias = fuse._solve_low_rank(gram, cross, rank, torch.float64)
        got = x.double() @ down.T @ up.T + up_bias
        top = torch.linalg.svd(fitted, full_matrices=False).Vh[:rank]
        torch.testing.assert_close(got, fitted @ top.T @ top)
        errors.append((got - y).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2]
    torch.testing.assert_close(got, fitted)  # 7 = the rank of [x, 1]: the full solution


@torch.no_grad()
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "fitted"])
def test_full_rank_text_correction_reproduces_untied_branches(batches, sequential):
    # Untied branches, every row at one t: what the text branch computes is an affine map of
    # what the single block reads, so a full-rank correction reproduces the dual model's
    # output, while image tokens keep the image branch's own projections. The shared fit
    # alone cannot.
    model = models.build(TINY, seed=5).eval()
    calibration = [inputs(b, t=0.4, seed=7) for b in batches]
    width = model.inner_dim
    hybrid = fuse.convert(model, 1, calibration, sequential, text_rank=width)
    shared = fuse.convert(model, 1, calibration, sequential)
    dual, single = model.transformer_blocks[-1].attn, hybrid.transformer_blocks[-1].attn
    for name in fuse.FITTED:
        assert torch.equal(getattr(single, name).weight, getattr(dual, name).weight)
    x = inputs(batches[1], t=0.4, seed=9)
    want = diffusers_forward(model, x)
    torch.testing.assert_close(diffusers_forward(hybrid, x), want, rtol=0, atol=5e-3)
    corrected = (diffusers_forward(hybrid, x) - want).abs().max()
    assert (diffusers_forward(shared, x) - want).abs().max() > 10 * corrected
    assert hybrid.transformer_blocks[-1].text_down.weight.shape == (width, width)


@torch.no_grad()
def test_text_correction_ranks_trade_parameters_for_error(batches):
    # The error right after conversion falls as the correction's rank grows, and a single
    # block's correction costs (4 x rank + 3) x width parameters. A low rank can lose to the
    # shared fit (which bends the image projections instead) on a random model; a full one
    # cannot.
    model = models.build(TINY, seed=0).eval()
    calibration = [inputs(b, t=t, seed=7) for b in batches for t in (0.2, 0.5, 0.8)]
    held = inputs(data.synthetic(TINY, samples=6, batch_size=6, seed=12)[0], t=0.5, seed=3)
    want = diffusers_forward(model, held)
    base = models.count_parameters(fuse.convert(model, 4))
    errors = []
    for rank in (0, 4, 16, 32):
        hybrid = fuse.convert(model, 4, calibration, sequential=True, text_rank=rank)
        extra = models.count_parameters(hybrid) - base
        assert extra == (4 * (4 * rank + 3) * model.inner_dim if rank else 0)
        errors.append(((diffusers_forward(hybrid, held) - want).norm() / want.norm()).item())
    assert errors[1] > errors[2] > errors[3] and errors[0] > errors[3], errors
    with pytest.raises(ValueError, match="exceeds the model's width"):
        fuse.convert(model, 4, calibration, text_rank=model.inner_dim + 1)


def test_progressive_phases_go_deepest_first():
    assert fuse.phases(5, 2) == [2, 4, 5]
    assert fuse.phases(24, 6) == [6, 12, 18, 24]
    assert fuse.phases(4, 8) == [4]
    assert fuse.phases(6, 2, already=4) == [6]


@torch.no_grad()
@pytest.mark.parametrize("text_rank", [0, 4])
def test_hybrid_round_trips_through_save_and_load(teacher, tmp_path, batches, text_rank):
    calibration = [inputs(batches[0])] if text_rank else []
    hybrid = fuse.convert(teacher, 5, calibration, sequential=True, text_rank=text_rank)
    hybrid.save_pretrained(tmp_path / "hybrid")
    loaded = models.load(tmp_path / "hybrid")
    assert type(loaded) is AmberHybridTransformer2DModel
    assert (loaded.config.num_layers, loaded.config.num_single_layers) == (12, 5)
    assert loaded.config.single_text_rank == text_rank
    original, restored = hybrid.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = inputs(batches[0])
    assert torch.equal(diffusers_forward(loaded, x), diffusers_forward(hybrid, x))


@torch.no_grad()
def test_hybrid_runs_inside_qwen_image_pipeline(teacher):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=fuse.convert(teacher, 6),
    )
    out = pipe(
        prompt_embeds=torch.randn(1, 8, TINY["joint_attention_dim"]),
        prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3)


def test_max_keeps_a_layer_critical_at_one_timestep_where_mean_drops_it():
    # Layer 0 matters only at the last timestep; layer 1 is moderately useful everywhere.
    matrix = torch.tensor([[0.0, 0.0, 0.9], [0.5, 0.5, 0.5], [0.1, 0.1, 0.1], [1.0, 1.0, 1.0]])
    params = dict(
        target_layers=2, timesteps=[0.1, 0.5, 0.9], keep_first=0, keep_last=0, normalize="max"
    )
    top = ScoreStage(**params, aggregate="max")
    by_max = score.select(score.aggregate(matrix, top), top)
    mean = ScoreStage(**params, aggregate="mean")
    by_mean = score.select(score.aggregate(matrix, mean), mean)
    assert by_max == [0, 3] and by_mean == [1, 3]
    # Protected layers survive whatever their score.
    guard = ScoreStage(**{**params, "keep_first": 1, "keep_last": 0}, aggregate="mean")
    assert score.select(score.aggregate(matrix, guard), guard) == [0, 3]


def test_iterative_scoring_removes_one_layer_per_round(teacher, batches):
    result = score.score(
        teacher, batches[:1], ScoreStage(target_layers=8, timesteps=[0.5], mode="iterative")
    )
    assert len(result.keep) == 8 and len(result.removal_order) == 4
    assert sorted(set(range(12)) - set(result.keep)) == sorted(result.removal_order)
    assert 0 in result.keep and 11 in result.keep  # keepFirst / keepLast default to 1


def test_heatmap_is_written(teacher, batches, tmp_path):
    result = score.score(teacher, batches[:1], ScoreStage(target_layers=6, timesteps=[0.3, 0.7]))
    path = score.heatmap(result, tmp_path / "importance.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert score.ScoreResult.from_json(result.to_json()) == result


def test_parameter_arithmetic_of_the_real_recipes():
    from amber import presets
    from amber_trainer.costs.sizes import recipe_sizes

    rows = recipe_sizes({}, presets.build("amber-6b", 60, {}))
    teacher, pruned, fused = (r["parameters"] for r in rows)
    assert 20.3e9 < teacher < 20.5e9  # Qwen-Image: 20.4B
    assert 10.1e9 < pruned < 10.3e9  # 30 layers: ~10.2B
    # 27 of 30 single-stream, each with a text correction of half the width: the paper's
    # hybrid (24 of 30, no correction) is the same size, 6.16B.
    assert 6.1e9 < fused < 6.2e9
    assert (rows[2]["dual_blocks"], rows[2]["single_blocks"]) == (3, 27)
    paper = {"singleLayers": 24, "blocksPerPhase": 24, "textRankFraction": 0.0}
    paper_rows = recipe_sizes({}, presets.build("amber-6b", 60, {"fuse": paper}))
    assert abs(paper_rows[2]["parameters"] - fused) < 0.01e9


def test_a_bf16_teacher_scores_rows_written_in_another_precision(teacher):
    """The GPU path (bf16 teacher) on rows stored as fp32: rows() casts them to the model."""
    rows = data.synthetic_dataset(dict(teacher.config), 4, 8, 8, seed=3)
    low = models.build(dict(teacher.config)).to(torch.bfloat16).eval()
    batch = rows.rows([0, 1, 2], None, torch.bfloat16)
    assert batch.latents.dtype == batch.text.dtype == torch.bfloat16
    assert batch.text_mask.dtype == torch.long
    matrix = score.direct_effect_matrix(low, [batch], [0.3, 0.7])
    assert matrix.shape == (len(low.transformer_blocks), 2) and torch.isfinite(matrix).all()
    assert (matrix > 0).any()


@torch.no_grad()
def test_block_influence_is_zero_for_an_identity_block_and_ranks_it_last(batches):
    model = models.build(TINY, seed=3).eval()
    make_identity(model.transformer_blocks[4])
    matrix = score.influence_matrix(model, batches, [0.2, 0.8])
    assert matrix.shape == (12, 2)
    assert torch.allclose(matrix[4], torch.zeros(2, dtype=matrix.dtype), atol=1e-6)
    assert torch.all(matrix[[i for i in range(12) if i != 4]] > 1e-4)
    params = ScoreStage(target_layers=11, criterion="block-influence", keep_first=0, keep_last=0)
    assert score.score(model, batches, params).keep == [i for i in range(12) if i != 4]


def test_data_free_baselines_keep_their_patterns(teacher):
    def keep(criterion, **kw):
        params = ScoreStage(target_layers=6, criterion=criterion, **kw)
        return score.score(teacher, [], params).keep

    assert keep("first") == [0, 1, 2, 3, 4, 5]
    assert keep("uniform") == [0, 2, 4, 7, 9, 11]
    picked = keep("random", seed=1)
    assert len(picked) == 6 and {0, 11} <= set(picked)  # keepFirst/keepLast still hold
    assert picked == keep("random", seed=1) and picked != keep("random", seed=2)


def _run_hooked(model, x, hook):
    """The velocity with `hook(k, block_input, (txt, img))` -> (txt, img) on every block."""
    handles = [
        block.register_forward_hook(
            lambda m, a, kw, out, k=k: hook(k, kw["hidden_states"], out), with_kwargs=True
        )
        for k, block in enumerate(model.transformer_blocks)
    ]
    try:
        return forward.velocity(model, x)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_direct_effect_equals_patching_the_downstream_blocks(teacher, batches):
    """Brute force: block i adds nothing while every other block adds exactly the update
    it added in the full pass (forward hooks): only block i's own contribution is gone."""
    ts = [0.3, 0.9]
    matrix = score.direct_effect_matrix(teacher, batches, ts, seed=4)
    samples = sum(len(b) for b in batches)
    for i in (0, 5, 11):
        expected = torch.zeros(len(ts), dtype=torch.float64)
        for j, x in score.calibration_inputs(batches, ts, seed=4):
            updates = {}

            def record(k, before, out, updates=updates):
                updates[k] = out[1] - before
                return out

            def patched(k, before, out, updates=updates, i=i):
                return out[0], before if k == i else before + updates[k]

            full = _run_hooked(teacher, x, record).double().flatten(1)
            without = _run_hooked(teacher, x, patched).double().flatten(1)
            expected[j] += ((without - full).norm(dim=1) / full.norm(dim=1)).sum() / samples
        torch.testing.assert_close(matrix[i], expected, rtol=1e-4, atol=1e-7)


def _enumerate_partitions(scores, params):
    """Every partition into targetLayers contiguous spans, checked against the rules."""
    import itertools

    layers = len(scores)
    guard = score.protected(layers, params)
    best = None
    for cuts in itertools.combinations(range(1, layers), params.target_layers - 1):
        bounds = [0, *cuts, layers]
        spans = [(a, b - 1) for a, b in itertools.pairwise(bounds)]
        if any(b - a + 1 > params.max_span for a, b in spans):
            continue
        if any(b > a and any(i in guard for i in range(a, b + 1)) for a, b in spans):
            continue
        cost = 0.0
        for a, b in spans:
            rep = prune.representative(range(a, b + 1), scores)
            cost += sum(scores[i] for i in range(a, b + 1) if i != rep)
        if best is None or cost < best - 1e-12:
            best = cost
    return best


@pytest.mark.parametrize("seed", range(12))
def test_span_partition_is_the_optimum_found_by_enumeration(seed):
    import random

    rng = random.Random(seed)
    layers = rng.randint(5, 9)
    target = rng.randint(2, layers - 1)
    params = ScoreStage(
        target_layers=max(target, 2),
        max_span=rng.randint(2, 5),
        keep_first=rng.randint(0, 1),
        keep_last=rng.randint(0, 1),
    )
    scores = [rng.random() for _ in range(layers)]
    best = _enumerate_partitions(scores, params)
    if best is None:
        with pytest.raises(ValueError, match="maxSpan"):
            score.partition(scores, params)
        return
    spans, reps = score.partition(scores, params)
    assert [i for a, b in spans for i in range(a, b + 1)] == list(range(layers))
    assert len(spans) == params.target_layers
    assert all(b - a + 1 <= params.max_span for a, b in spans)
    cost = sum(scores[i] for a, b in spans for i in range(a, b + 1) if i not in reps)
    assert cost == pytest.approx(best)
    assert all(a <= r <= b for (a, b), r in zip(spans, reps, strict=True))


def test_representative_is_the_most_important_block_or_the_middle_of_a_long_span():
    importance = [0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.7]
    assert prune.representative([0, 1, 2], importance) == 1
    assert prune.representative([2, 3], importance) == 3
    assert prune.representative([1, 2, 3, 4, 5], importance) == 3  # long: the middle
    assert prune.representative([4], None) == 4


@torch.no_grad()
def test_representative_init_copies_the_right_block_and_never_mixes_the_last(teacher):
    importance = [1, 0.2, 0.9, 0.1, 0.3, 1, 0.4, 0.5, 0.2, 0.6, 0.1, 1]
    spans = [[0, 0], [1, 2], [3, 6], [7, 10], [11, 11]]
    keep = [0, 2, 5, 9, 11]  # what the partition would return for these spans
    entries = prune.layer_map(keep, 12, "representative", importance, spans)
    assert [e.sources for e in entries] == [[0], [2], [5], [9], [11]]
    student = prune.prune(teacher, entries)
    for j, k in enumerate(keep):
        for name, value in student.transformer_blocks[j].state_dict().items():
            assert torch.equal(value, teacher.transformer_blocks[k].state_dict()[name])
    # Without a partition (top selection): the nearest groups' representatives.
    nearest = prune.layer_map([0, 3, 8, 11], 12, "representative", importance)
    assert [e.span for e in nearest] == [(0, 1), (2, 5), (6, 9), (10, 11)]
    assert [e.sources for e in nearest] == [[0], [4], [8], [11]]  # [2, 5] is long: middle
    # Averaging never touches the teacher's last block, which feeds the head.
    averaged = prune.layer_map([0, 5, 10], 12, "average")
    assert averaged[-1].span == (8, 11) and averaged[-1].sources == [11]
    with pytest.raises(ValueError, match="cover"):
        prune.layer_map([0, 5], 12, "representative", importance, [[0, 3], [4, 10]])


@torch.no_grad()
def test_mlp_inputs_rebuild_the_blocks_output(teacher, batches):
    img, txt, cond = forward.embed(teacher, inputs(batches[0]))
    block = teacher.transformer_blocks[5]
    parts = spanfit.mlp_inputs(block, img, txt, cond)
    for branch, out in zip(spanfit.BRANCHES, forward.run_block(block, img, txt, cond), strict=True):
        residual, hidden, gate = parts[branch]
        mlp = getattr(block, f"{branch}_mlp")
        torch.testing.assert_close(residual + gate * mlp.net[-1](hidden), out)


@torch.no_grad()
def test_mlp_inputs_rebuild_a_single_stream_blocks_output(teacher, batches):
    hybrid = fuse.convert(teacher, 3, text_rank=4)
    img, txt, cond = forward.embed(hybrid, inputs(batches[0]))
    img, txt = forward.run_blocks(hybrid.transformer_blocks[:10], img, txt, cond)
    block = hybrid.transformer_blocks[10]
    parts = spanfit.mlp_inputs(block, img, txt, cond)
    for branch, out in zip(spanfit.BRANCHES, forward.run_block(block, img, txt, cond), strict=True):
        residual, hidden, gate = parts[branch]
        torch.testing.assert_close(residual + gate * block.img_mlp.net[-1](hidden), out)


@torch.no_grad()
def test_fusion_mlp_refit_brings_the_hybrid_closer_to_the_dual_model(teacher, batches):
    calibration = _refit_calibration(batches)
    rank = 8

    def error(hybrid):
        total = power = 0.0
        for x in calibration:
            reference = forward.velocity(teacher, x)
            total += float((forward.velocity(hybrid, x) - reference).pow(2).sum())
            power += float(reference.pow(2).sum())
        return (total / power) ** 0.5

    plain = fuse.convert(teacher, 4, calibration, sequential=True, text_rank=rank)
    refitted = fuse.convert(teacher, 4, calibration, True, rank, refit_mlp=True)
    assert error(refitted) < 0.9 * error(plain)
    # The converted blocks' MLP output layers move, and so do the later blocks' text
    # corrections, fitted on the streams the refitted blocks now produce; nothing else.
    changed = {
        name
        for name, value in refitted.state_dict().items()
        if not torch.equal(value, plain.state_dict()[name])
    }
    mlps = {
        f"transformer_blocks.{i}.img_mlp.net.2.{p}"
        for i in range(8, 12)
        for p in ("weight", "bias")
    }
    corrections = {
        f"transformer_blocks.{i}.{p}"
        for i in range(9, 12)
        for p in ("text_down.weight", "text_up.weight", "text_up.bias")
    }
    assert mlps <= changed <= mlps | corrections
    with pytest.raises(ValueError, match="sequential"):
        fuse.convert(teacher, 4, calibration, sequential=False, refit_mlp=True)


def _refit_calibration(batches, times=(0.2, 0.7)):
    return [inputs(b, t, seed=i) for i, t in enumerate(times) for b in batches]


@torch.no_grad()
def test_span_refit_solves_each_channels_gated_least_squares(teacher, batches):
    """The refit of a block, brute force: per output channel, the least squares of
    gate * ([a, 1] w) against what the block must add, stacked over every calibration
    token, with the ridge towards the copied block's weights, solved with lstsq on the
    design matrix itself (no Grams, no time keys)."""
    spans = [(0, 0), (1, 3), (4, 7), (8, 10), (11, 11)]
    entries = prune.layer_map([0, 2, 5, 9, 11], 12, "representative", None, spans)
    student = prune.prune(teacher, entries)
    calibration = _refit_calibration(batches)
    spanfit.refit(teacher, student, spans, calibration)
    j, last = 2, spans[2][1]
    block = student.transformer_blocks[j]
    for branch_index, branch in enumerate(spanfit.BRANCHES):
        rows, wants, gates = [], [], []
        for x in calibration:
            img, txt, cond = forward.embed(teacher, x)
            target = forward.run_blocks(teacher.transformer_blocks[: last + 1], img, txt, cond)
            seen = forward.run_blocks(student.transformer_blocks[:j], img, txt, cond)
            residual, hidden, gate = spanfit.mlp_inputs(block, *seen, cond)[branch]
            real = torch.ones(hidden.shape[:2], dtype=torch.bool)
            if branch == "txt" and cond.mask is not None:
                real = cond.mask.bool()
            rows.append(hidden[real])
            wants.append((target[branch_index] - residual)[real])
            gates.append(gate.expand_as(residual)[real])
        a = torch.cat(rows).double()
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], -1)
        want, gate = torch.cat(wants).double(), torch.cat(gates).double()
        layer = getattr(block, f"{branch}_mlp").net[-1]
        for c in range(want.shape[1]):
            design = gate[:, c : c + 1] * a
            ridge = spanfit.RIDGE * (design.T @ design).diagonal().mean()
            padded = torch.cat([design, ridge.sqrt() * torch.eye(a.shape[1], dtype=a.dtype)])
            copied = teacher.transformer_blocks[5].get_submodule(f"{branch}_mlp").net[-1]
            prior = torch.cat([copied.weight[c], copied.bias[c : c + 1]]).double()
            target = torch.cat([want[:, c], ridge.sqrt() * prior])  # the ridge pulls to the copy
            best = torch.linalg.lstsq(padded, target[:, None]).solution[:, 0]
            fitted = torch.cat([layer.weight[c], layer.bias[c : c + 1]]).double()
            torch.testing.assert_close(fitted, best, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_span_refit_keeps_a_student_that_is_the_teacher_and_helps_a_pruned_one(teacher, batches):
    calibration = _refit_calibration(batches)
    whole = prune.prune(teacher, prune.layer_map(list(range(12)), 12, "keep"))
    errors = spanfit.refit(teacher, whole, [(i, i) for i in range(12)], calibration)
    assert max(after for _, after in errors) < 1e-3
    x = inputs(batches[0], 0.5, seed=9)
    reference = forward.velocity(teacher, x)
    drift = (forward.velocity(whole, x) - reference).norm() / reference.norm()
    assert drift < 1e-3  # the copied weights were the solution already
    spans = [(0, 0), (1, 3), (4, 7), (8, 10), (11, 11)]
    student = prune.prune(teacher, prune.layer_map([0, 2, 5, 9, 11], 12, "keep", None, spans))
    errors = spanfit.refit(teacher, student, spans, calibration)
    assert all(after <= before + 1e-6 for before, after in errors[:2])
    assert errors[-1][1] < errors[-1][0]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_span_refit_streams_blocks_through_the_device_and_leaves_models_on_the_host(
    teacher, batches, device
):
    """The prune stage keeps both models on the host (a 20B teacher in float32 does not fit
    an accelerator) and the refit takes one block at a time to the device: the same
    weights as a refit run where the models live, and between blocks and after, every
    parameter on the host (the cuda case runs where there is one)."""
    spans = [(0, 0), (1, 3), (4, 7), (8, 10), (11, 11)]
    entries = prune.layer_map([0, 2, 5, 9, 11], 12, "representative", None, spans)
    calibration = _refit_calibration(batches)
    reference = prune.prune(teacher, entries)
    expected = spanfit.refit(teacher, reference, spans, calibration)
    student = prune.prune(teacher, entries)
    on_device = [loop.cast(x, torch.device(device), torch.float32) for x in calibration]
    homes = []

    def on_block(j):
        homes.append({p.device.type for m in (teacher, student) for p in m.parameters()})

    errors = spanfit.refit(teacher, student, spans, on_device, torch.device(device), on_block)
    assert homes == [{"cpu"}] * len(spans)
    assert {p.device.type for m in (teacher, student) for p in m.parameters()} == {"cpu"}
    for (b, a), (b_ref, a_ref) in zip(errors, expected, strict=True):
        assert b == pytest.approx(b_ref, rel=1e-3) and a == pytest.approx(a_ref, rel=1e-3)
    for name, weight in student.state_dict().items():
        torch.testing.assert_close(weight, reference.state_dict()[name], rtol=1e-3, atol=1e-4)


def test_sampler_weights_are_each_timestep_share_of_the_sampler():
    params = ScoreStage(target_layers=2, timesteps=[0.9, 0.1, 0.5])
    uniform = score.sampler_weights(params.timesteps, params)
    torch.testing.assert_close(uniform, torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64))
    shifted = score.sampler_weights(
        params.timesteps, params.model_copy(update={"sampler": "shifted"})
    )
    assert shifted.sum().item() == pytest.approx(1.0)
    assert shifted[0] > uniform[0] and shifted[1] < uniform[1]  # more steps at high noise
    # Median normalisation: one dominant block does not flatten the others.
    matrix = torch.tensor([[100.0, 100.0, 100.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    agg = score.aggregate(matrix, params)
    torch.testing.assert_close(agg, torch.tensor([50.0, 1.0, 0.5], dtype=torch.float64))
