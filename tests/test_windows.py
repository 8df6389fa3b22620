"""LeanK's windowed cache end to end: full-channel sink/recent windows, a pruned middle that
tokens move into `buffer` at a time, streaming heads without middle K or V, against the masked
reference applying the same windows to the unmodified HF model."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import kvcompile
from kvcompile import Plan, Recipe, calibrate
from tests.masked_reference import Windows, decode, masked_attention, masked_reference_decode
from tests.tiny_models import make_tiny_model, slow_unless
from tests.test_runtime import assert_encoded_cache_is_the_prefill_cache

STEPS = 20
SINK, RECENT, BUFFER = 2, 4, 4
WINDOWS = Windows(SINK, RECENT, BUFFER)
# layer 0: widths 8 and 4; layer 1: a streaming head and width 6; layer 2: both heads streaming;
# layer 3: not planned (all channels, no windows)
K_CHANNELS = {0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]], 2: [[], []]}
PLAN = Plan.from_k_channels(K_CHANNELS, sink=SINK, recent=RECENT, buffer=BUFFER)
LAYERS = 4


@functools.cache
def _model(arch):
    """A 4-layer tiny `arch` model and its captured program (capturing is the slow part)."""
    model = make_tiny_model(arch, num_layers=LAYERS)
    return model, kvcompile.capture(model)


def _transform(arch, plan=PLAN):
    model, program = _model(arch)
    return model, kvcompile.transform(model, plan, program=program)


def _prompt(batch, length, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _transformed_decode(tm, prompt, steps=STEPS):
    """Greedy one-token steps; checks the cache's bytes against the plan's formula after every call.
    Returns the last-position logits of every call, the fed tokens and the middle length seen after
    every call."""
    out = tm(prompt, use_cache=True)
    logits, fed, middles = [out.logits[:, -1]], [], []
    for step in range(steps + 1):
        cache = out.past_key_values
        assert cache.nbytes == tm.plan.cache_nbytes(tm.shape, tm.dtype, cache.batch_size, cache.length), cache.length
        middles.append(cache.entries["value.0"].shape[2])
        if step == steps:
            break
        fed.append(logits[-1].argmax(-1))
        out = tm(fed[-1][:, None], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return logits, torch.stack(fed, dim=1), middles


def _max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("arch", slow_unless(["llama", "qwen2", "phi3", "qwen3"], default=("llama",)))
def test_decode_matches_the_windowed_reference(arch):
    model, tm = _transform(arch)
    prompt = _prompt(2, 12)
    got, tokens, middles = _transformed_decode(tm, prompt)
    want, want_tokens = masked_reference_decode(model, prompt, K_CHANNELS, next_tokens=tokens, steps=STEPS, windows=WINDOWS)
    for step, (w, g) in enumerate(zip(want, got)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=lambda m: f"call {step}: {m}")
    # tokens moved from the window to the middle several times, one buffer at a time
    assert middles == [max(0, (12 + i - SINK - RECENT) // BUFFER * BUFFER) for i in range(STEPS + 1)]
    assert len(set(middles)) >= 3
    # and the windows matter: neither the dense model nor pruning every past key gives these logits
    dense, _ = decode(model, prompt, next_tokens=tokens, steps=STEPS)
    pruned_everywhere, _ = masked_reference_decode(model, prompt, K_CHANNELS, next_tokens=tokens, steps=STEPS)
    assert _max_difference(dense[1:], want[1:]) > 1e-2
    assert _max_difference(pruned_everywhere[1:], want[1:]) > 1e-2


def test_prompt_shorter_than_the_windows_fills_them_first():
    model, tm = _transform("llama")
    prompt = _prompt(2, 3, seed=1)
    got, tokens, middles = _transformed_decode(tm, prompt, steps=12)
    want, _ = masked_reference_decode(model, prompt, K_CHANNELS, next_tokens=tokens, steps=12, windows=WINDOWS)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    assert middles[:7] == [0] * 7 and middles[7] == 4 and middles[-1] == 8  # 10 tokens: 4; 15 tokens: 8


def test_chunks_of_several_tokens_attend_causally_among_themselves():
    model, tm = _transform("llama")
    chunks = [_prompt(2, 12), _prompt(2, 3, seed=5), _prompt(2, 6, seed=6)]
    cache, want_cache = None, DynamicCache()
    for chunk in chunks:
        out = tm(chunk, past_key_values=cache)
        cache = out.past_key_values
        with masked_attention(model, K_CHANNELS, WINDOWS), torch.no_grad():
            want = model(chunk, past_key_values=want_cache, use_cache=True).logits
        torch.testing.assert_close(out.logits, want, atol=1e-4, rtol=0)
    assert cache.entries["value.0"].shape[2] == 12  # (21 - 6) // 4 * 4


def test_cache_layout_after_prefill():
    model, tm = _transform("llama")
    cache = tm(_prompt(2, 12)).past_key_values
    # 12 tokens: middle [2, 6) (4 tokens), window = 2 sink + 6 latest
    window = (2, 2, 8, 16)
    assert {name: tuple(t.shape) for name, t in cache.entries.items()} == {
        "key_window.0": window, "value_window.0": window, "key.0.w8": (2, 1, 4, 8), "key.0.w4": (2, 1, 4, 4),
        "value.0": (2, 2, 4, 16),
        "key_window.1": window, "value_window.1": window, "key.1.w6": (2, 1, 4, 6), "value.1": (2, 1, 4, 16),
        "key_window.2": window, "value_window.2": window, "value.2": (2, 0, 4, 16),  # streaming: no middle
        "key.3": (2, 2, 12, 16), "value.3": (2, 2, 12, 16),
    }
    dense = model(_prompt(2, 12), use_cache=True).past_key_values.layers
    keys, values = dense[1].keys, dense[1].values
    kept = [1, 3, 5, 7, 9, 11]
    torch.testing.assert_close(cache.entries["key_window.1"], torch.cat([keys[:, :, :2], keys[:, :, 6:]], dim=2))
    torch.testing.assert_close(cache.entries["key.1.w6"], keys[:, 1:, 2:6][..., kept])
    torch.testing.assert_close(cache.entries["value.1"], values[:, 1:, 2:6])
    torch.testing.assert_close(cache.entries["value_window.1"], torch.cat([values[:, :, :2], values[:, :, 6:]], dim=2))


def test_buffer_one_is_an_exact_sliding_window():
    model, tm = _transform("qwen2", PLAN.with_windows(SINK, RECENT, buffer=1))
    prompt = _prompt(2, 9)
    got, tokens, middles = _transformed_decode(tm, prompt, steps=6)
    assert middles == [9 + i - SINK - RECENT for i in range(7)]
    want, _ = masked_reference_decode(model, prompt, K_CHANNELS, next_tokens=tokens, steps=6, windows=Windows(SINK, RECENT, 1))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_without_windows_streaming_heads_still_attend_uniformly_over_everything():
    plan = Plan.from_k_channels(K_CHANNELS)
    assert plan.with_windows(0, 0) == plan and not plan.windowed
    _, tm = _transform("llama", plan)
    cache = tm(_prompt(2, 12)).past_key_values
    assert not any("window" in name for name in cache.entries)
    assert cache.entries["value.2"].shape == (2, 2, 12, 16) and "key.2" not in cache.entries
    assert "windowed_attention" not in tm.decode_program.code


def test_encoded_dense_cache_is_the_prefill_cache():
    model, tm = _transform("phi3")
    assert_encoded_cache_is_the_prefill_cache(model, tm, _prompt(2, 13), _prompt(2, 1, seed=9))


def test_merged_heads_keep_windows_too(tmp_path):
    model = make_tiny_model("llama")
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = calibrate(model, Recipe(kv_group_size=2, rope="commute", k_sparsity=0.5, align=4), tokens, progress=False)
    plan = plan.with_windows(SINK, RECENT, buffer=BUFFER)
    merge_only = Plan.from_k_channels({}, model=plan.model).with_merges(plan.merges)
    kvcompile.transform(model, merge_only).save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    prompt = _prompt(2, 10, seed=3)
    got, fed, middles = _transformed_decode(kvcompile.transform(model, plan), prompt, steps=8)
    want, _ = masked_reference_decode(merged, prompt, plan.k_channels, next_tokens=fed, steps=8, windows=WINDOWS)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert middles[-1] == 12
