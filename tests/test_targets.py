"""Precomputed teacher targets: exact, and used only where they belong."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from amber import local
from amber_trainer import data
from amber_trainer.model import models
from amber_trainer.train import targets
from amber_trainer.train.objectives import teacher_states
from trainer_helpers import stage_of, tiny_resource

CONFIG = {**models.TINY, "num_layers": 6}


def _dataset(samples: int = 40) -> data.TensorDataset:
    return data.synthetic_dataset(CONFIG, samples, latent_size=8, text_tokens=8, seed=3)


def test_a_pooled_target_is_the_teachers_fresh_answer(tmp_path):
    teacher = models.build(CONFIG, seed=1).eval()
    train = _dataset()
    sampling = targets.TimestepSampling("logit-normal", 0.0, 1.0)
    pool = targets.build(teacher, train, 20, sampling, seed=5, with_states=True, batch_size=8)
    targets.save(pool, tmp_path)
    boundaries = [0, 2, 6]
    loaded = targets.load(tmp_path, sampling, boundaries)
    assert loaded is not None and len(loaded) == 20 and loaded.train_rows == len(train)
    assert loaded.teacher == targets.fingerprint(teacher)
    assert targets.load(tmp_path, targets.UNIFORM) is None  # another distribution: no pool
    entries = [3, 17, 0, 11]  # another batch composition than the build's
    batch, x, target = loaded.inputs(train, entries)
    assert torch.equal(target, loaded.noise[entries] - batch.latents)
    fresh_states, fresh_velocity = teacher_states(teacher, x, boundaries)
    states, velocity = loaded.teacher_outputs(entries, boundaries)
    torch.testing.assert_close(velocity, fresh_velocity, rtol=1e-5, atol=1e-6)
    for b in boundaries:
        for cached, fresh in zip(states[b], fresh_states[b], strict=True):
            torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(states[2][0], states[6][0])  # boundaries are not mixed up
    # Times follow the pool's distribution, and a velocity-only pool refuses states.
    assert float(loaded.timestep.min()) > 0 and float(loaded.timestep.max()) < 1
    light = targets.build(teacher, train, 4, sampling, seed=5, with_states=False)
    with pytest.raises(ValueError, match="no hidden states"):
        light.teacher_outputs([0], [1])


def test_a_changed_weight_changes_the_fingerprint():
    teacher = models.build(CONFIG, seed=1)
    before = targets.fingerprint(teacher)
    assert before == targets.fingerprint(models.build(CONFIG, seed=1))
    with torch.no_grad():
        teacher.transformer_blocks[3].attn.to_q.weight[0, 0] += 1e-6
    assert targets.fingerprint(teacher) != before


def _cache(folder, teacher_seed: int) -> None:
    """Data shards as the encode stage writes them, and a distill pool beside them."""
    rows = _dataset(48)
    folder.mkdir()
    save_file(
        {
            "latents": rows.latents,
            "text": rows.text,
            "text_mask": rows.text_mask,
            "side": torch.tensor(rows.side),
        },
        str(folder / "pairs-00000.safetensors"),
    )
    train, _ = data.load_shards([folder / "pairs-00000.safetensors"]).split()
    teacher = models.build(CONFIG, seed=teacher_seed).eval()
    targets.save(targets.build(teacher, train, 32, targets.UNIFORM, 0, with_states=True), folder)


@pytest.mark.parametrize("teacher_seed, used", [(0, True), (9, False)])
def test_distill_reads_a_pool_only_of_its_own_teacher(tmp_path, teacher_seed, used):
    cache = tmp_path / "cache"
    _cache(cache, teacher_seed)
    doc = tiny_resource(str(tmp_path / "store"))
    doc["spec"]["teacher"] = {"config": CONFIG, "seed": 0}
    doc["spec"]["data"] = {"cacheUri": str(cache)}
    doc["spec"]["stages"] = doc["spec"]["stages"][:3]  # score, prune, distill
    stage_of(doc, "score")["targetLayers"] = 3
    stage_of(doc, "distill").update(steps=4, checkpointEvery=100)
    events = []
    obj = local.AmberCompression.model_validate(doc)
    outcomes, _ = local.run_resource(obj, launcher="here", on_event=lambda r, e: events.append(e))
    assert [o.status for o in outcomes if o.stage == "distill"] == ["ran"]
    names = [e.event for e in events if e.stage == "distill"]
    assert ("reading precomputed teacher targets" in names) == used
    assert ("teacher targets are from another teacher; computing them live" in names) != used
