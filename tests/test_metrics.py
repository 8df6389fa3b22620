"""Metrics on a tiny random Llama: each one checked against a plain computation or a known value."""

import math

import pytest
import torch

import kvcompile
from kvcompile import ModelShape, Plan
from kvcompile.metrics import greedy_agreement, kept_k_fraction, kv_bytes_per_token, perplexity
from tests.tiny_models import make_tiny_model

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 2
SCORE_LAST = 6


def channel_plan(*per_head: list[int]) -> Plan:
    return Plan.from_k_channels({layer: list(per_head) for layer in range(LAYERS)})


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", num_layers=LAYERS)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def all_channels(model):
    return kvcompile.transform(model, channel_plan(list(range(HEAD_DIM)), list(range(HEAD_DIM))))


@pytest.fixture(scope="module")
def one_channel(model):
    return kvcompile.transform(model, channel_plan([0], [HEAD_DIM - 1]))


def test_perplexity_equals_one_full_forward(model, windows):
    with torch.no_grad():
        logits = model(windows).logits[:, -SCORE_LAST - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, -SCORE_LAST:].reshape(-1))
    assert perplexity(model, windows, SCORE_LAST, progress=False) == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_all_channels_plan_keeps_perplexity(model, all_channels, windows):
    dense = perplexity(model, windows, SCORE_LAST, progress=False)
    assert perplexity(all_channels, windows, SCORE_LAST, progress=False) == pytest.approx(dense, rel=1e-4)


def test_pruning_changes_perplexity(model, one_channel, windows):
    dense = perplexity(model, windows, SCORE_LAST, progress=False)
    assert abs(perplexity(one_channel, windows, SCORE_LAST, progress=False) / dense - 1) > 1e-2


@pytest.mark.parametrize("score_last", [0, 20, 25])
def test_score_last_must_leave_a_prefix(model, windows, score_last):
    with pytest.raises(ValueError, match="score_last"):
        perplexity(model, windows, score_last, progress=False)


def test_agreement_of_a_model_with_itself_is_one(model, all_channels, windows):
    assert greedy_agreement(model, model, windows[:2, :8], new_tokens=5, progress=False) == 1.0
    assert greedy_agreement(model, all_channels, windows[:2, :8], new_tokens=5, progress=False) == 1.0


def test_agreement_with_a_heavily_pruned_model_is_below_one(model, one_channel, windows):
    assert greedy_agreement(model, one_channel, windows[:2, :8], new_tokens=5, progress=False) < 1.0


def test_bytes_per_token_of_both_caches_follow_the_plan_formula(model, one_channel, windows):
    with torch.no_grad():
        prefill = one_channel(windows[:, :10], use_cache=True)
        compressed = one_channel(windows[:, 10:12], past_key_values=prefill.past_key_values).past_key_values
        dense = model(windows, use_cache=True).past_key_values
    plan, shape = one_channel.plan, one_channel.shape
    assert kv_bytes_per_token(compressed) == (
        plan.k_bytes_per_token(shape, torch.float32),
        plan.v_bytes_per_token(shape, torch.float32),
    )
    full = LAYERS * KV_HEADS * HEAD_DIM * 4
    assert kv_bytes_per_token(dense) == (full, full)
    assert kv_bytes_per_token(compressed)[0] == LAYERS * KV_HEADS * 1 * 4


def test_kept_k_fraction_counts_unplanned_layers_as_full():
    shape = ModelShape(model_type="llama", num_layers=LAYERS, num_kv_heads=KV_HEADS, num_heads=4, head_dim=HEAD_DIM)
    half = [list(range(8)), list(range(8, 16))]
    assert kept_k_fraction(channel_plan(*half), shape) == 0.5
    assert kept_k_fraction(Plan.from_k_channels({0: half}), shape) == 0.75
