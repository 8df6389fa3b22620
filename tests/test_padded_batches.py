"""The cache written in place with per-row lengths: a padded batch decodes each row as that row alone
(left or right padding; K-channel, windowed and merged plans), the buffers are never copied while
they have room, and a cache knows which plan wrote it."""

import functools

import pytest
import torch

import kvcompile
from kvcompile import Plan, Recipe, calibrate
from kvcompile.cache import CacheMismatch
from tests.tiny_models import make_tiny_model

STEPS = 12
LENGTHS = (9, 4, 13)  # rows of one batch; the windowed plan below moves tokens at different steps per row
K_CHANNELS = {0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]}


@functools.cache
def _model(arch):
    model = make_tiny_model(arch, num_layers=3)
    return model, kvcompile.capture(model)


def _plan(kind, arch):
    if kind == "pruned":
        return Plan.from_k_channels(K_CHANNELS)
    if kind == "windowed":
        return Plan.from_k_channels(K_CHANNELS, sink=2, recent=4, buffer=4)
    model, program = _model(arch)
    chunks = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    # both KV heads of every layer merged into one, after RoPE
    return calibrate(model, Recipe(kv_group_size=2, rope="post"), chunks, progress=False, program=program)


@functools.cache
def _transformed(arch, kind):
    model, program = _model(arch)
    return kvcompile.transform(model, _plan(kind, arch), program=program)


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in LENGTHS]


def _padded(rows, side):
    """(ids, mask) of `rows` padded on the `side` "left", "right" or "between" (the padding between
    each row's first and second half)."""
    width, device = max(len(row) for row in rows), rows[0].device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        first = {"left": 0, "right": len(row), "between": len(row) // 2}[side]
        place = torch.cat([torch.arange(first), torch.arange(width - len(row) + first, width)]).to(device)
        ids[i, place], mask[i, place] = row, 1
    return ids, mask


def _greedy_logits(tm, ids, mask=None, steps=STEPS, cache=None):
    """Per step, the logits of each row's next token (from its last real token), and the cache;
    `cache`: the one `ids` continue (`mask` then covers it too)."""
    out = tm(ids, attention_mask=mask, use_cache=True, past_key_values=cache)
    if mask is None:
        logits = out.logits[:, -1]
    else:
        last = torch.where(mask[:, -ids.shape[1]:].bool(), torch.arange(ids.shape[1], device=ids.device), -1).amax(1)
        logits = out.logits[torch.arange(ids.shape[0], device=ids.device), last]
    history = [logits]
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        out = tm(token, past_key_values=out.past_key_values, use_cache=True)
        logits = out.logits[:, -1]
        history.append(logits)
    return torch.stack(history, dim=1), out.past_key_values


# every plan kind and padding side on Llama; the windowed and merged plans, each side once, on
# Qwen2 (q/k/v bias) and Phi-3 (fused qkv)
CASES = [("llama", kind, side) for kind in ("pruned", "windowed", "merged") for side in ("left", "right")] + [
    ("qwen2", "windowed", "left"), ("qwen2", "merged", "right"), ("phi3", "windowed", "right"), ("phi3", "merged", "left"),
]


@pytest.mark.parametrize("arch, kind, side", CASES)
def test_each_row_of_a_padded_batch_decodes_as_it_does_alone(arch, kind, side):
    tm = _transformed(arch, kind)
    rows = _rows()
    ids, mask = _padded(rows, side)
    batched, cache = _greedy_logits(tm, ids, mask)
    for i, row in enumerate(rows):
        alone, _ = _greedy_logits(tm, row[None])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(batched[i].argmax(-1), alone[0].argmax(-1))
    assert cache.row_lengths == [n + STEPS for n in LENGTHS]


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_takes_a_tokenizers_padded_batch(side):
    tm = _transformed("llama", "windowed")
    rows = _rows(seed=1)
    ids, mask = _padded(rows, side)
    tokens = tm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=[])
    assert tokens.shape == (len(rows), ids.shape[1] + STEPS)
    for i, row in enumerate(rows):
        alone = tm.generate(row[None], max_new_tokens=STEPS, eos_token_id=[])
        assert torch.equal(tokens[i, ids.shape[1]:], alone[0, len(row):]), i


@pytest.mark.parametrize("kind", ["pruned", "windowed"])
def test_bytes_count_each_row_at_its_length_and_buffers_stay_put(kind):
    tm = _transformed("llama", kind)
    ids, mask = _padded(_rows(), "left")
    out = tm(ids, attention_mask=mask, use_cache=True, max_cache_len=64)
    cache = out.past_key_values
    storage = {name: buffer.data_ptr() for name, buffer in cache.buffers.items()}
    for _ in range(STEPS):
        expected = sum(tm.plan.cache_nbytes(tm.shape, tm.dtype, 1, n) for n in cache.row_lengths)
        assert cache.nbytes == expected
        assert cache.capacity_nbytes >= cache.nbytes
        out = tm(torch.full((len(LENGTHS), 1), 5), past_key_values=cache, use_cache=True)
    # every step wrote into the buffers allocated at the prefill: no token held was copied
    assert {name: buffer.data_ptr() for name, buffer in cache.buffers.items()} == storage


def test_buffers_grow_by_doubling_and_keep_their_tokens():
    tm = _transformed("llama", "pruned")
    prompt = _rows()[2][None]
    grown, _ = _greedy_logits(tm, prompt, steps=70)  # the default capacity (64) overflows
    out = tm(prompt, use_cache=True, max_cache_len=prompt.shape[1] + 71)
    assert out.past_key_values.buffers["value.2"].shape[2] == prompt.shape[1] + 71
    roomy, _ = _greedy_logits(tm, prompt, steps=70)
    torch.testing.assert_close(grown, roomy)


def test_a_cache_written_under_another_plan_is_refused_naming_both():
    model, program = _model("llama")
    tm = _transformed("llama", "pruned")
    other = kvcompile.transform(model, Plan.from_k_channels({0: K_CHANNELS[0], 1: [[0, 2, 4, 6], [1, 3, 5, 7, 9, 11]]}),
                                program=program)
    cache = other(_rows()[0][None], use_cache=True).past_key_values
    with pytest.raises(CacheMismatch, match=f"plan {other.plan.fingerprint()}.*{tm.plan.fingerprint()}"):
        tm(torch.tensor([[5]]), past_key_values=cache)


def test_copy_branches_two_independent_continuations():
    tm = _transformed("llama", "windowed")
    prompt = _rows()[0][None]
    prefix = tm(prompt, use_cache=True).past_key_values
    branch = prefix.copy()
    first = tm(torch.tensor([[7]]), past_key_values=prefix).logits
    second = tm(torch.tensor([[9]]), past_key_values=branch).logits
    fresh = tm(prompt, use_cache=True).past_key_values
    torch.testing.assert_close(second, tm(torch.tensor([[9]]), past_key_values=fresh).logits)
    assert not torch.allclose(first, second)


CONTINUATIONS = (5, 1, 3)  # each row's next turn, as many tokens as its row of LENGTHS says


@pytest.mark.parametrize(("kind", "side"), [("pruned", "left"), ("windowed", "left"), ("merged", "left"),
                                            ("windowed", "right"), ("merged", "between")])
def test_a_padded_continuation_extends_each_row_as_it_does_alone(kind, side):
    """A padded batch's prompts, then a next turn of a different length per row (padded on `side`),
    then greedy steps: each row's real logits equal the row's own, fed without padding; the windowed
    plan moves window tokens at different steps per row."""
    tm = _transformed("llama", kind)
    rows = _rows()
    turns = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(7 + n)) for n in CONTINUATIONS]
    ids, mask = _padded(rows, "left")
    cache = tm(ids, attention_mask=mask, use_cache=True).past_key_values
    turn_ids, turn_mask = _padded(turns, side)
    batched, cache = _greedy_logits(tm, turn_ids, torch.cat([mask, turn_mask], dim=1), cache=cache)
    for i, (row, turn) in enumerate(zip(rows, turns)):
        alone_cache = tm(row[None], use_cache=True).past_key_values
        alone, _ = _greedy_logits(tm, turn[None], cache=alone_cache)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(batched[i].argmax(-1), alone[0].argmax(-1))
    assert cache.row_lengths == [n + t + STEPS for n, t in zip(LENGTHS, CONTINUATIONS)]
    assert cache.nbytes == sum(tm.plan.cache_nbytes(tm.shape, tm.dtype, 1, n) for n in cache.row_lengths)


def test_a_continuations_bad_padding_is_refused_naming_the_row():
    tm = _transformed("llama", "pruned")
    cache = tm(torch.randint(3, 128, (2, 5)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 1\): a call continuing a cache takes"):
        tm(torch.tensor([[5, 6], [6, 7]]), past_key_values=cache, attention_mask=torch.tensor([[1], [1]]))
    with pytest.raises(ValueError, match="row 0 holds 5 tokens and continues by 1 real of 7"):
        tm(torch.full((2, 7), 5), past_key_values=cache, attention_mask=torch.tensor([[1] * 5 + [0] * 6 + [1], [1] * 12]))
    assert cache.row_lengths == [5, 5]  # nothing was written
