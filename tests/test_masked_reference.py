from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests import masked_reference
from tests.masked_reference import ATTN_NAME, decode, masked_attention, masked_reference_decode
from tests.tiny_models import ARCHITECTURES, make_tiny_model

HEAD_DIM, KV_HEADS, STEPS = 16, 2, 6


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def full_plan(num_layers=2):
    return {layer: [list(range(HEAD_DIM))] * KV_HEADS for layer in range(num_layers)}


def half_plan(num_layers=2):
    # Different halves per head, so a mix-up of KV heads or GQA groups would show.
    return {layer: [list(range(0, HEAD_DIM, 2)), list(range(HEAD_DIM // 2))] for layer in range(num_layers)}


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_full_plan_equals_plain_model(model, input_ids):
    plain, plain_tokens = decode(model, input_ids, steps=STEPS)
    ref, ref_tokens = masked_reference_decode(model, input_ids, full_plan(), steps=STEPS)
    assert len(ref) == STEPS + 1 and ref[0].shape == (2, 128)
    assert torch.equal(ref_tokens, plain_tokens)
    assert max_diff(ref, plain) < 1e-5


def test_half_plan_changes_decode_only(model, input_ids):
    plain, tokens = decode(model, input_ids, steps=STEPS)
    ref, fed = masked_reference_decode(model, input_ids, half_plan(), next_tokens=tokens, steps=STEPS)
    assert torch.equal(fed, tokens)
    assert max_diff(ref[:1], plain[:1]) < 1e-5  # prefill is dense
    assert all((r - p).abs().max().item() > 1e-3 for r, p in zip(ref[1:], plain[1:]))


def test_matches_zeroing_key_channels(model, input_ids):
    # Zeroing the pruned channels of the keys (per KV head, no GQA bookkeeping) is the same math.
    plan = half_plan()

    def keys_masked_sdpa(module, query, key, value, attention_mask, **kwargs):
        if key.shape[2] > query.shape[2]:
            keep = torch.zeros(KV_HEADS, 1, HEAD_DIM, dtype=torch.bool)
            for head, ids in enumerate(plan[module.layer_idx]):
                keep[head, 0, ids] = True
            key = key * keep
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_keys_masked_sdpa", keys_masked_sdpa)
    _, tokens = decode(model, input_ids, steps=STEPS)
    ref, _ = masked_reference_decode(model, input_ids, plan, next_tokens=tokens, steps=STEPS)
    model.set_attn_implementation("test_keys_masked_sdpa")
    try:
        other, _ = decode(model, input_ids, next_tokens=tokens, steps=STEPS)
    finally:
        model.set_attn_implementation("sdpa")
    assert max_diff(ref, other) < 1e-5


def test_unplanned_layer_is_untouched(input_ids):
    model = make_tiny_model("llama", num_layers=1)
    plain, tokens = decode(model, input_ids, steps=2)
    ref, _ = masked_reference_decode(model, input_ids, {5: [[], []]}, next_tokens=tokens, steps=2)
    assert max_diff(ref, plain) < 1e-5


def test_empty_head_gives_uniform_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, HEAD_DIM, generator=gen)
    k = 5 * torch.randn(1, KV_HEADS, 9, HEAD_DIM, generator=gen)
    v = torch.randn(1, KV_HEADS, 9, HEAD_DIM, generator=gen)
    visible = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    visible[..., 3] = False
    module = SimpleNamespace(layer_idx=0, training=False)
    token = masked_reference._PLAN.set({0: [[], list(range(HEAD_DIM))]})
    try:
        out, _ = masked_reference._masked_attention(module, q, k, v, visible, scaling=0.25)
    finally:
        masked_reference._PLAN.reset(token)
    assert out.shape == (1, 1, 4, HEAD_DIM)
    uniform = v[0, 0, visible[0, 0, 0]].mean(0)  # KV head 0's group: uniform over unmasked keys
    torch.testing.assert_close(out[0, 0, :2], uniform.expand(2, -1))
    assert (out[0, 0, 2:] - v[0, 1, visible[0, 0, 0]].mean(0)).abs().max() > 1e-2  # head 1 keeps all


def test_empty_head_end_to_end(input_ids):
    model = make_tiny_model("qwen2")
    plain, tokens = decode(model, input_ids, steps=2)
    ref, _ = masked_reference_decode(model, input_ids, {1: [[], list(range(HEAD_DIM))]}, next_tokens=tokens, steps=2)
    assert all(x.isfinite().all() for x in ref)
    assert max_diff(ref[:1], plain[:1]) < 1e-5 and max_diff(ref[1:], plain[1:]) > 1e-3


def test_attn_implementation_restored(input_ids):
    model = make_tiny_model("phi3", num_layers=1)
    masked_reference_decode(model, input_ids, full_plan(1), steps=1)
    assert model.config._attn_implementation == "sdpa"

    with pytest.raises(ValueError, match="out of range"):
        masked_reference_decode(model, input_ids, {0: [[0, HEAD_DIM], [1]]}, steps=1)
    assert model.config._attn_implementation == "sdpa"

    with pytest.raises(RuntimeError, match="boom"):
        with masked_attention(model, full_plan(1)):
            assert model.config._attn_implementation == ATTN_NAME
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in model.model.layers)


def test_tiny_models_deterministic_and_peaked():
    a, b, c = make_tiny_model("llama", seed=3), make_tiny_model("llama", seed=3), make_tiny_model("llama", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a.set_attn_implementation("eager")
        out = a(ids, output_attentions=True)
    assert out.attentions[0][..., 8:, :].amax(-1).median() > 8 / 32
    assert out.logits.isfinite().all() and out.logits.abs().max() < 100
