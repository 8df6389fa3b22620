"""static-qk calibration: plan shape, the kept-count rule, and the statistic checked against HF itself."""

import pytest
import torch
from pydoc_data.topics import topics
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvcompile import ModelShape
from kvcompile.calibration.calibrate import kept_channel_counts, qk_channel_scores, static_k_plan
from kvcompile.calibration.recipe import Recipe, RecipeError
from kvcompile.evaluation.text import CALIBRATION_TOPICS, EVALUATION_TOPICS, calibration_text, evaluation_text
from tests.tiny_models import make_tiny_model

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 2
RECORDING_ATTENTION = "kvcompile_test_recording"


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", num_layers=LAYERS)


@pytest.fixture(scope="module")
def chunks():
    return torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def plan(model, chunks):
    return static_k_plan(model, chunks, sparsity=0.5, align=4, progress=False)


@pytest.fixture(scope="module")
def scores(model, chunks):
    return qk_channel_scores(model, list(chunks), progress=False)


def test_plan_keeps_aligned_sorted_channels_for_every_head(model, plan):
    assert plan.model == ModelShape.from_config(model.config)
    assert list(plan.k_channels) == list(range(LAYERS))
    for layer in range(LAYERS):
        assert plan.kept_counts(layer) == (8,) * KV_HEADS
        for ids in plan.k_channels[layer]:
            assert list(ids) == sorted(set(ids)) and 0 <= ids[0] and ids[-1] < HEAD_DIM
    assert plan.meta == {"method": "static-qk", "sparsity": 0.5, "align": 4, "calibration_tokens": 72}


def test_plan_keeps_the_top_scoring_channels(plan, scores):
    for layer in range(LAYERS):
        for head, ids in enumerate(plan.k_channels[layer]):
            kept = scores[layer, head, list(ids)]
            dropped = scores[layer, head, [c for c in range(HEAD_DIM) if c not in ids]]
            assert kept.min() > dropped.max()


def _recording_attention(records):
    def attention(module, query, key, value, attention_mask, **kwargs):
        records.append((module.layer_idx, query, key))  # post-RoPE; key not yet repeated for GQA
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attention


def test_scores_match_statistic_recorded_by_hf_attention(scores, chunks):
    records = []
    AttentionInterface.register(RECORDING_ATTENTION, _recording_attention(records))
    reference_model = make_tiny_model("llama", num_layers=LAYERS)
    reference_model.set_attn_implementation(RECORDING_ATTENTION)
    with torch.no_grad():
        for chunk in chunks:
            reference_model(chunk[None])

    group = 4 // KV_HEADS
    for layer in range(LAYERS):
        queries = torch.cat([q for lay, q, _ in records if lay == layer], dim=2)  # (1, Hq, tokens, D)
        keys = torch.cat([k for lay, _, k in records if lay == layer], dim=2)
        q_mean = queries.abs().mean(dim=(0, 2)).view(KV_HEADS, group, HEAD_DIM).mean(dim=1)
        k_mean = keys.abs().mean(dim=(0, 2))
        expected = (q_mean * k_mean).double()
        assert torch.allclose(scores[layer], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "heads, head_dim, sparsity, align",
    [(90, 64, 0.5, 16), (90, 64, 0.7, 16), (90, 64, 0.0, 16), (12, 16, 0.3, 4), (8, 128, 0.6, 32), (7, 64, 0.55, 16)],
)
def test_kept_counts_are_aligned_and_meet_the_sparsity_over_all_heads(heads, head_dim, sparsity, align):
    scores = [torch.rand(head_dim, generator=torch.Generator().manual_seed(h)) for h in range(heads)]
    counts = kept_channel_counts(scores, sparsity, align)
    assert all(c % align == 0 and align <= c <= head_dim for c in counts)
    target = heads * head_dim * (1 - sparsity)
    assert abs(sum(counts) - target) <= align / 2  # the nearest multiple of align
    assert max(counts) - min(counts) <= align  # as even as the alignment allows


def test_left_over_units_go_to_the_heads_that_lose_the_most():
    flat, peaked = torch.ones(64), torch.tensor([100.0] * 16 + [1.0] * 48)
    # 40% of 2 x 64 channels: 51.2 -> 48 kept, 16 each and the one unit left for the flat head
    assert kept_channel_counts([peaked, flat], 0.6, 16) == [16, 32]
    assert kept_channel_counts([flat, peaked], 0.6, 16) == [32, 16]


def test_a_head_never_keeps_nothing():
    assert kept_channel_counts([torch.rand(64)] * 4, 0.99, 16) == [16] * 4


@pytest.mark.parametrize(
    "sparsity, align, message",
    [(1.0, 4, "sparsity must be in"), (-0.1, 4, "sparsity must be in"), (0.5, 5, "align"), (0.5, 0, "align")],
)
def test_bad_recipe_is_a_clear_error(model, chunks, sparsity, align, message):
    with pytest.raises(RecipeError, match=message):
        static_k_plan(model, chunks, sparsity=sparsity, align=align, progress=False)


def test_no_calibration_tokens_is_an_error(model):
    with pytest.raises(RecipeError, match="no calibration tokens"):
        static_k_plan(model, [], progress=False)


def test_calibration_and_evaluation_text_split_the_topics():
    assert set(CALIBRATION_TOPICS).isdisjoint(EVALUATION_TOPICS)
    assert set(CALIBRATION_TOPICS) | set(EVALUATION_TOPICS) == set(topics)
    assert len(calibration_text()) > 100_000 and len(evaluation_text()) > 100_000
    assert topics[CALIBRATION_TOPICS[0]] in calibration_text() and topics[EVALUATION_TOPICS[0]] in evaluation_text()


def test_windowed_recipes_are_refused_for_models_with_sliding_layers():
    shape = ModelShape("mistral", num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16, sliding_windows=(4, 4))
    Recipe(k_sparsity=0.5, align=4).check(shape)  # a sliding layer's K may be pruned, within its own window
    with pytest.raises(RecipeError, match=r"layers \[0, 1\] attend sliding windows: calibrate with sink=0 and recent=0"):
        Recipe(k_sparsity=0.5, align=4, sink=2, recent=4).check(shape)
