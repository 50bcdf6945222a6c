"""On-policy trajectories (`onPolicyFraction`): the states the student's own sampler visits."""

from __future__ import annotations

import itertools

import pytest
import torch

from amber.stages import FinetuneStage, FuseStage
from amber_trainer import data
from amber_trainer.model import generate, models
from amber_trainer.model.forward import FlowInputs, concat, velocity
from amber_trainer.train.rollouts import Rollouts

CONFIG = models.named_config("tiny", num_layers=2)


@pytest.fixture(scope="module")
def setup():
    model = models.build(CONFIG, seed=0).eval()
    train = data.synthetic_dataset(CONFIG, 12, latent_size=8, text_tokens=8, seed=0)
    return model, train


def student(model):
    return lambda x: velocity(model, x)


def euler_states(model, train, row: int, noise: torch.Tensor, steps: int, shift: float):
    """Every state the sampler visits before its last step, computed the plain way."""
    batch = train.rows([row])
    x, states = noise[None], []
    for t, t_next in itertools.pairwise(generate.schedule(steps, shift)):
        states.append((t, x))
        inputs = FlowInputs(x, batch.text, batch.text_mask, torch.tensor([t]), batch.img_shapes)
        x = x + (t_next - t) * velocity(model, inputs)
    return states


@torch.no_grad()
def test_a_trajectory_visits_the_states_of_the_students_own_euler_sampler(setup):
    model, train = setup
    steps, shift = 4, 3.0
    rollouts = Rollouts(1, steps, shift, seed=3)
    row, noise = rollouts._begin(0, train)
    expected = euler_states(model, train, row, noise, steps, shift)
    for t, x in expected:  # one step further per draw
        drawn = rollouts.draw(student(model), train)
        assert drawn.timestep.tolist() == [pytest.approx(t)]
        torch.testing.assert_close(drawn.hidden_states, x, rtol=1e-5, atol=1e-5)
        assert torch.equal(drawn.encoder_hidden_states, train.rows([row]).text)
    # Back at t = 1 from new noise once the last step is taken.
    again = rollouts.draw(student(model), train)
    assert again.timestep.tolist() == [1.0]
    assert not torch.equal(again.hidden_states[0], noise)


@torch.no_grad()
def test_trajectories_start_spread_over_the_sampler_times_and_keep_them_spread(setup):
    model, train = setup
    steps = 5
    rollouts = Rollouts(steps, steps, 1.0, seed=0)
    times = generate.schedule(steps, 1.0)[:-1]
    for _ in range(2 * steps):
        drawn = rollouts.draw(student(model), train)
        assert sorted(drawn.timestep.tolist()) == pytest.approx(sorted(times))
    # Each trajectory was begun afresh at least once, on its own caption and noise.
    assert (rollouts.episode >= 1).all()


@torch.no_grad()
def test_a_restored_state_draws_what_the_original_draws(setup):
    model, train = setup
    first = Rollouts(3, 4, 3.0, seed=1)
    for _ in range(3):
        first.draw(student(model), train)
    second = Rollouts(3, 4, 3.0, seed=1)
    second.load_state_dict(first.state_dict())
    for _ in range(5):
        a, b = first.draw(student(model), train), second.draw(student(model), train)
        assert torch.equal(a.hidden_states, b.hidden_states)
        assert torch.equal(a.timestep, b.timestep)
    # Another seed or rank is another set of trajectories.
    other = Rollouts(3, 4, 3.0, seed=1, rank=1)
    assert not torch.equal(other.draw(student(model), train).hidden_states, a.hidden_states)


def test_concat_keeps_every_row_in_order(setup):
    _, train = setup
    a, b = train.rows([0, 1]), train.rows([2])
    t = torch.tensor([0.1, 0.2])
    joined = concat([a.noised(t, a.latents), b.noised(torch.tensor([0.3]), b.latents)])
    assert joined.hidden_states.shape[0] == 3 and joined.timestep.tolist() == pytest.approx(
        [0.1, 0.2, 0.3]
    )
    assert torch.equal(joined.encoder_hidden_states[2], b.text[0])
    assert len(joined.img_shapes) == 3


def test_on_policy_rows_need_the_teachers_velocity():
    with pytest.raises(ValueError, match="onPolicyFraction needs distillWeight"):
        FinetuneStage(onPolicyFraction=0.5, distillWeight=0.0)
    with pytest.raises(ValueError, match="onPolicyFraction needs distillWeight"):
        FuseStage(singleLayers=2, onPolicyFraction=0.5)
    stage = FinetuneStage(onPolicyFraction=0.5, distillWeight=0.9, microBatchSize=24)
    assert stage.on_policy_rows(24) == 12
    assert FinetuneStage(onPolicyFraction=0.5, distillWeight=1).on_policy_rows(1) == 1
    assert FinetuneStage().on_policy_rows(24) == 0
