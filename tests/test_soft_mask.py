"""The soft mask: its values, its schedules, and that it really drives Llama attention."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from conan_embedding.modeling.soft_mask import (
    SCHEDULES,
    SoftMaskSchedule,
    additive_soft_mask,
    alpha_at,
    soft_mask_values,
    soft_masked_forward,
)


def _tiny_llama(attn_implementation: str, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn_implementation,
    )
    return LlamaModel(config).eval()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 97, (3, 7), generator=generator)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0  # right padding
    attention_mask[2, 3:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def test_mask_values_follow_the_formula():
    mask = torch.ones(1, 4, dtype=torch.long)
    values = soft_mask_values(mask, alpha=0.25)[0]
    length = 4
    for i in range(1, 5):
        for j in range(1, 5):
            expected = 1.0 if j <= i else min(0.25 * length / i, 1.0)
            assert values[i - 1, j - 1].item() == pytest.approx(expected)
    flipped = soft_mask_values(mask, alpha=0.5, variant="i_over_L")[0]
    assert flipped[0, 1].item() == pytest.approx(0.5 * 1 / 4)
    assert flipped[2, 3].item() == pytest.approx(0.5 * 3 / 4)


def test_padding_keys_are_masked_and_lengths_are_per_row():
    _, attention_mask = _batch()
    values = soft_mask_values(attention_mask, alpha=0.3)
    assert torch.all(values[1, :, 5:] == 0)
    assert torch.all(values[2, :, 3:] == 0)
    # row 2 has L = 3 real tokens: M_12 = min(0.3 * 3 / 1, 1) = 0.9
    assert values[2, 0, 1].item() == pytest.approx(0.9)
    additive = additive_soft_mask(attention_mask, alpha=0.3)
    assert additive.shape == (3, 1, 7, 7)
    assert torch.all(additive[2, 0, :, 3:] == torch.finfo(torch.float32).min)
    assert torch.isfinite(additive).all()


def test_left_padding_counts_positions_from_the_first_real_token():
    right = soft_mask_values(torch.tensor([[1, 1, 1, 0, 0]]), alpha=0.2)
    left = soft_mask_values(torch.tensor([[0, 0, 1, 1, 1]]), alpha=0.2)
    assert torch.allclose(right[0, :3, :3], left[0, 2:, 2:])


@pytest.mark.parametrize("schedule", ["linear", "accelerating", "decelerating"])
def test_alpha_and_mask_values_are_monotone_in_t(schedule):
    total = 20
    alphas = [alpha_at(t, total, schedule) for t in range(total + 1)]
    assert alphas[0] == 0.0 and alphas[-1] == 1.0
    assert all(b >= a for a, b in zip(alphas, alphas[1:], strict=False))
    mask = torch.ones(2, 6, dtype=torch.long)
    previous = soft_mask_values(mask, alphas[0])
    for alpha in alphas[1:]:
        current = soft_mask_values(mask, alpha)
        assert torch.all(current >= previous)
        previous = current
    assert torch.all(previous == 1.0)


def test_schedule_shapes_and_baselines():
    assert alpha_at(5, 10, "linear") == pytest.approx(0.5)
    assert alpha_at(5, 10, "accelerating") == pytest.approx(0.25)
    assert alpha_at(5, 10, "decelerating") == pytest.approx(0.75)
    assert alpha_at(0, 10, "hard") == 1.0
    assert alpha_at(10, 10, "causal") == 0.0
    assert set(SCHEDULES) == {"linear", "accelerating", "decelerating", "hard", "causal"}
    with pytest.raises(ValueError, match="schedule"):
        alpha_at(1, 10, "cosine")
    with pytest.raises(ValueError, match="variant"):
        SoftMaskSchedule("linear", 10, "L/i")


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_alpha_zero_is_exactly_the_causal_model(implementation):
    model = _tiny_llama(implementation)
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        causal = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        soft = soft_masked_forward(model, input_ids, attention_mask, alpha=0.0)
    real = attention_mask.bool()
    torch.testing.assert_close(soft[real], causal[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_alpha_one_is_exactly_the_bidirectional_model(implementation):
    model = _tiny_llama(implementation)
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        soft = soft_masked_forward(model, input_ids, attention_mask, alpha=1.0)
        causal = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        model.config.is_causal = False  # transformers' own bidirectional path
        bidirectional = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(soft[real], bidirectional[real], rtol=0, atol=1e-6)
    # and it is not the causal model: earlier tokens now see later ones
    assert (soft[0, 0] - causal[0, 0]).abs().max() > 1e-3


def test_intermediate_alpha_lies_between_and_changes_outputs():
    model = _tiny_llama("sdpa")
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        outputs = [
            soft_masked_forward(model, input_ids, attention_mask, alpha=a) for a in (0.0, 0.1, 1.0)
        ]
    assert (outputs[1][0, 0] - outputs[0][0, 0]).abs().max() > 1e-4
    assert (outputs[1][0, 0] - outputs[2][0, 0]).abs().max() > 1e-4


def test_gradients_reach_the_upper_triangle():
    model = _tiny_llama("sdpa")
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    attention_mask = torch.ones_like(input_ids)
    mask = torch.ones_like(input_ids)

    def grad_of_first_position_wrt_last_token(alpha: float) -> torch.Tensor:
        embeds = model.embed_tokens(input_ids).detach().requires_grad_(True)
        additive = additive_soft_mask(mask, alpha)
        hidden = model(inputs_embeds=embeds, attention_mask=additive).last_hidden_state
        hidden[0, 0].sum().backward()
        return embeds.grad[0, -1]

    assert torch.all(grad_of_first_position_wrt_last_token(0.0) == 0)
    assert grad_of_first_position_wrt_last_token(0.05).abs().sum() > 0
    # and the weights that only act through the upper triangle get gradient too
    model.zero_grad()
    hidden = soft_masked_forward(model, input_ids, attention_mask, alpha=0.05)
    hidden[0, 0].sum().backward()
    assert model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert not math.isnan(model.layers[0].self_attn.k_proj.weight.grad.sum().item())


def test_schedule_object_produces_the_step_mask():
    schedule = SoftMaskSchedule("linear", total_steps=4)
    attention_mask = torch.ones(1, 3, dtype=torch.long)
    assert schedule.alpha(2) == pytest.approx(0.5)
    torch.testing.assert_close(
        schedule.mask(attention_mask, 2), additive_soft_mask(attention_mask, 0.5)
    )
    assert schedule.ends_bidirectional
    assert not SoftMaskSchedule("causal", 4).ends_bidirectional
