"""Sliding-window layers keep only their window: a sliding layer's cache is a ring of its last
window - 1 tokens, pruned as the plan says, against the dense model with transformers' own sliding
cache (keep-everything plans), the masked reference, which runs the unmodified model under its own
sliding masks (pruned plans), and, for the static cache under the kvcompile backend, `transform`.
Windows are shorter than the prompts."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import kvcompile
from kvcompile import Plan, PlanError
from kvcompile.benchmarks.throughput import keep_everything_plan
from kvcompile.calibration import leank
from kvcompile.calibration.recipe import LeanKTraining, Recipe
from kvcompile.capture import CACHE_NAME
from kvcompile.evaluation.text import calibration_text
from kvcompile.pipeline import canonical_program
from tests.masked_reference import masked_attention, masked_reference_decode
from tests.tiny_models import byte_level_tokenizer, make_tiny_model, slow_unless

WINDOW, STEPS = 4, 20
SLIDING, FULL = "sliding_attention", "full_attention"
# a sliding layer pruned to widths 8 and 4; a layer with a head keeping nothing; a layer left whole
K_CHANNELS = {0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]}
# two layers, one sliding and one global: Qwen2's slide from layer max_window_layers on
HYBRIDS = {
    "gemma3": dict(sliding_window=WINDOW, layer_types=[SLIDING, FULL]),
    "cohere2": dict(sliding_window=WINDOW, layer_types=[SLIDING, FULL]),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}


MISTRAL = dict(sliding_window=WINDOW)  # every layer slides


@functools.cache
def _model(arch):
    """A tiny `arch` model with sliding layers and its captured program (capturing is the slow part)."""
    model = make_tiny_model(arch, **HYBRIDS.get(arch, MISTRAL))
    return model, kvcompile.capture(model)


def _mistral():
    return _model("mistral")


def _prompt(batch, length, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


PROMPT = _prompt(2, 9, seed=9)  # the compiled-backend cases' prompt


def _sliding_layers(shape):
    return [layer for layer in range(shape.num_layers) if shape.window(layer) is not None]


def _assert_holds_the_window(tm, cache):
    """nbytes is the plan's formula; each sliding layer holds its last window - 1 tokens in a ring
    of window slots (a one-token step's)."""
    assert cache.nbytes == tm.plan.cache_nbytes(tm.shape, tm.dtype, cache.batch_size, cache.length)
    for layer in _sliding_layers(tm.shape):
        assert tm.plan.held_tokens(layer, tm.shape, cache.length) == (min(cache.length, WINDOW - 1), 0)
        rings = [buffer for name, buffer in cache.buffers.items() if int(name.split(".")[1]) == layer]
        assert rings and all(buffer.shape[2] == WINDOW for buffer in rings)


def _dense_decode(model, prompt, steps):
    """The model with transformers' own cache (sliding layers keep their window): last logits of
    the prompt and of each greedy step, and the cache's K/V bytes after each call."""
    cache = DynamicCache(config=model.config)
    logits, held = [], []
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps + 1):
            logits.append(model(tokens, use_cache=True, **{CACHE_NAME: cache}).logits[:, -1])
            held.append(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))
            tokens = logits[-1].argmax(-1, keepdim=True)
    return logits, held


def _transformed_decode(tm, prompt, steps):
    """Last logits of the prompt and of each greedy step, and the cache after each call."""
    out = tm(prompt)
    logits, caches = [out.logits[:, -1]], []
    for step in range(steps + 1):
        caches.append(out.past_key_values)
        _assert_holds_the_window(tm, out.past_key_values)
        if step < steps:
            out = tm(logits[-1].argmax(-1, keepdim=True), past_key_values=out.past_key_values)
            logits.append(out.logits[:, -1])
    return logits, [cache.nbytes for cache in caches]


def test_keep_everything_plan_is_the_dense_model_in_transformers_bytes_or_fewer():
    model, program = _mistral()
    shape = kvcompile.ModelShape.from_config(model.config)
    keep = keep_everything_plan(shape)
    half_k = Plan.from_k_channels({layer: [list(range(8))] * 2 for layer in range(2)})
    prompt = _prompt(2, 12)
    want, dense_bytes = _dense_decode(model, prompt, STEPS)
    got, kept_bytes = _transformed_decode(kvcompile.transform(model, keep, program=program), prompt, STEPS)
    for step, (w, g) in enumerate(zip(want, got)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=lambda m: f"call {step}: {m}")
        assert torch.equal(g.argmax(-1), w.argmax(-1)), step
    assert all(kept <= dense for kept, dense in zip(kept_bytes, dense_bytes))
    # a 50% K plan holds 3/4 of those bytes (half the K, all the V): the plan's own ratio
    pruned = kvcompile.transform(model, half_k, program=program)
    _, pruned_bytes = _transformed_decode(pruned, prompt, 2)
    ratio = half_k.cache_nbytes(shape, torch.float32, 2, 100) / keep.cache_nbytes(shape, torch.float32, 2, 100)
    assert ratio == 0.75 and all(p == ratio * k for p, k in zip(pruned_bytes, kept_bytes))
    # and the window matters: the same weights attending everything give other logits
    everything = make_tiny_model("mistral", sliding_window=None)
    assert max((a - b).abs().max().item() for a, b in zip(_dense_decode(everything, prompt, 4)[0][1:], want[1:5])) > 1e-2


@pytest.mark.parametrize("arch", slow_unless(list(HYBRIDS), default=("gemma3",)))
def test_pruned_hybrid_decode_matches_the_masked_reference(arch):
    model, program = _model(arch)
    assert _sliding_layers(kvcompile.ModelShape.from_config(model.config)) == ([1] if arch == "qwen2" else [0])
    plan = Plan.from_k_channels(K_CHANNELS)
    tm = kvcompile.transform(model, plan, program=program)
    prompt = _prompt(2, 10, seed=1)
    got, _ = _transformed_decode(tm, prompt, STEPS // 2)
    fed = torch.stack([g.argmax(-1) for g in got[:-1]], dim=1)
    want, _ = masked_reference_decode(model, prompt, K_CHANNELS, next_tokens=fed, steps=STEPS // 2)
    for step, (w, g) in enumerate(zip(want, got)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=lambda m: f"call {step}: {m}")
        assert torch.equal(g.argmax(-1), w.argmax(-1)), step


def test_calls_of_several_tokens_regrow_the_rings():
    model, program = _mistral()
    plan = Plan.from_k_channels(K_CHANNELS)
    tm = kvcompile.transform(model, plan, program=program)
    cache, want_cache = None, DynamicCache()
    for chunk in (_prompt(2, 9), _prompt(2, 3, seed=5), _prompt(2, 6, seed=6), _prompt(2, 1, seed=7)):
        out = tm(chunk, past_key_values=cache)
        cache = out.past_key_values
        with masked_attention(model, K_CHANNELS), torch.no_grad():
            want = model(chunk, use_cache=True, **{CACHE_NAME: want_cache}).logits
        torch.testing.assert_close(out.logits, want, atol=1e-4, rtol=0)
        assert cache.nbytes == plan.cache_nbytes(tm.shape, tm.dtype, 2, cache.length)
    assert {buffer.shape[2] for buffer in cache.buffers.values()} == {WINDOW - 1 + 6}  # the 6-token call's


def test_padded_rows_keep_their_own_windows():
    model, program = _mistral()
    plan = Plan.from_k_channels({0: K_CHANNELS[0]})  # layer 1's ring keeps every channel
    tm = kvcompile.transform(model, plan, program=program)
    rows = [_prompt(1, 11, seed=2)[0], _prompt(1, 6, seed=3)[0]]
    batch = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for index, row in enumerate(rows):  # left padding
        batch[index, 11 - len(row):], mask[index, 11 - len(row):] = row, 1
    got = tm.generate(batch, attention_mask=mask, max_new_tokens=8)
    for index, row in enumerate(rows):  # each row as the masked reference decodes it alone
        logits, fed = masked_reference_decode(model, row[None], plan.k_channels, steps=7)
        assert torch.equal(got[index, 11:], torch.cat([fed[0], logits[-1].argmax(-1)])), index
    cache = tm(batch, attention_mask=mask).past_key_values
    assert cache.nbytes == sum(tm.plan.cache_nbytes(tm.shape, tm.dtype, 1, n) for n in cache.row_lengths)


def test_a_left_padded_continuation_keeps_each_rows_window():
    """Rows continuing by 6, 2 and 0 real tokens in one call (longer than the window: the rings
    regrow, and a row's padding lands on tokens its window has left), then greedy steps: each row
    as it decodes alone."""
    model, program = _mistral()
    tm = kvcompile.transform(model, Plan.from_k_channels(K_CHANNELS), program=program)
    prompt, turns = _prompt(3, 7, seed=4), [_prompt(1, n, seed=10 + n)[0] for n in (6, 2, 0)]
    turn_ids, turn_mask = torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, 6, dtype=torch.long)
    for index, turn in enumerate(turns):
        turn_ids[index, 6 - len(turn):], turn_mask[index, 6 - len(turn):] = turn, 1
    cache = tm(prompt).past_key_values
    out = tm(turn_ids, past_key_values=cache, attention_mask=torch.cat([torch.ones(3, 7, dtype=torch.long), turn_mask], 1))
    got = [out.logits[:, -1]]
    for _ in range(STEPS // 2):
        got.append(tm(got[-1].argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1])
    for index, turn in enumerate(turns):  # the row alone: its prompt, then its turn unpadded
        alone = tm(prompt[index:index + 1]).past_key_values
        want = [tm(turn[None], past_key_values=alone).logits[:, -1] if len(turn) else None]  # all padding: no logits
        for step in range(STEPS // 2):
            feed = got[step][index].argmax(-1).view(1, 1)  # the batch's token, so that one wrong step shows once
            want.append(tm(feed, past_key_values=alone).logits[:, -1])
        first = 0 if len(turn) else 1
        torch.testing.assert_close(torch.cat([g[index:index + 1] for g in got[first:]]), torch.cat(want[first:]),
                                   atol=1e-4, rtol=0)
    assert cache.row_lengths == [7 + len(turn) + STEPS // 2 for turn in turns]
    assert cache.nbytes == sum(tm.plan.cache_nbytes(tm.shape, tm.dtype, 1, n) for n in cache.row_lengths)
    assert {buffer.shape[2] for buffer in cache.buffers.values()} == {WINDOW - 1 + 6}  # the 6-token call's rings


def test_calibration_prunes_sliding_layers_within_their_windows():
    model, program = _mistral()
    tokens = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    plan = kvcompile.calibrate(model, kvcompile.Recipe(k_sparsity=0.5, align=4), tokens, program=program, progress=False)
    assert plan.model.sliding_windows == (WINDOW, WINDOW) and sorted(plan.k_channels) == [0, 1]
    tm = kvcompile.transform(model, plan, program=program)
    prompt = _prompt(2, 9, seed=8)
    _assert_decodes_as_the_masked_reference(tm, model, plan.k_channels, prompt, steps=6, rtol=0)


@pytest.mark.slow
def test_merged_heads_keep_their_window_too(tmp_path):
    """KV heads merged (folded into the weights) then pruned: the rings hold the merged heads."""
    model, program = _mistral()
    tokens = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    recipe = kvcompile.Recipe(kv_group_size=2, rope="commute", k_sparsity=0.5, align=4)
    plan = kvcompile.calibrate(model, recipe, tokens, program=program, progress=False)
    merge_only = Plan.from_k_channels({}, model=plan.model).with_merges(plan.merges)
    kvcompile.transform(model, merge_only, program=program).save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tm = kvcompile.transform(model, plan, program=program)
    prompt = _prompt(2, 9, seed=3)
    _assert_decodes_as_the_masked_reference(tm, merged, plan.k_channels, prompt, steps=8, rtol=1e-4)


@pytest.mark.parametrize("arch", slow_unless(["mistral", "gemma3"], default=("mistral",)))
def test_compiled_on_the_static_cache_matches_transform(arch):
    """The kvcompile backend on a StaticCompressedCache, whose sliding layers are rings of window
    slots: transform's logits and tokens, the plan's bytes."""
    from tests.test_static_cache import STEPS as COMPILED_STEPS

    plan = Plan.from_k_channels({0: K_CHANNELS[0]})  # layer 0's ring pruned, layer 1's whole
    cache = _compiled_matches_transform(arch, plan, atol=1e-5, rtol=1e-5)
    length = PROMPT.shape[1] + COMPILED_STEPS
    assert cache.nbytes == plan.cache_nbytes(cache.shape, torch.float32, 2, length)
    sliding = _sliding_layers(cache.shape)
    assert {entry.shape[2] for layer in sliding for entry in cache.layers[layer].entries.values()} == {WINDOW}


@pytest.mark.parametrize("arch", slow_unless(list(HYBRIDS), default=("cohere2",)))
def test_a_healed_plan_compiled_on_the_static_cache_matches_transform(arch):
    """Projection updates in every layer under the backend on the hybrids: QK-norm (Gemma-3), the
    attention beside the MLP on one normed input (Cohere2), sliding layers from max_window_layers
    (Qwen2): the low-rank branches land on the attention's own projections."""
    from tests.test_update_projections import random_updates

    model, _ = _model(arch)
    plan = Plan.from_k_channels(K_CHANNELS).with_updates(random_updates(model, range(model.config.num_hidden_layers)))
    _compiled_matches_transform(arch, plan, atol=3e-5, rtol=1e-4)  # tests/test_static_cache.py's healed tolerance


def _compiled_matches_transform(arch, plan, **tolerance):
    """The backend on `plan`'s StaticCompressedCache decodes PROMPT greedily to transform's logits
    (within `tolerance`) and tokens; returns the cache."""
    from tests.test_backend import _greedy
    from tests.test_static_cache import STEPS as COMPILED_STEPS, _compiled_greedy

    model, program = _model(arch)
    torch._dynamo.reset()
    try:
        got_logits, got_tokens, cache = _compiled_greedy(model, plan, PROMPT)
    finally:
        torch._dynamo.reset()
    want_logits, want_tokens = _greedy(kvcompile.transform(model, plan, program=program), PROMPT, steps=COMPILED_STEPS)
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, **tolerance)
    assert torch.equal(got_tokens, want_tokens)
    return cache


def test_windowed_plans_leave_sliding_layers_alone():
    model, _ = _mistral()
    with pytest.raises(PlanError, match=r"layer 0, fields sink/recent: layer 0 attends a sliding window of 4 tokens"):
        kvcompile.transform(model, Plan.from_k_channels(K_CHANNELS, sink=2, recent=4))


def _assert_decodes_as_the_masked_reference(tm, reference_model, k_channels, prompt, steps, rtol):
    """`tm`'s greedy decode against `reference_model` with the unkept channels zeroed, fed the same tokens."""
    got, _ = _transformed_decode(tm, prompt, steps)
    fed = torch.stack([g.argmax(-1) for g in got[:-1]], dim=1)
    want, _ = masked_reference_decode(reference_model, prompt, k_channels, next_tokens=fed, steps=steps)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=rtol)


def test_leank_trains_sliding_layers_as_they_attend():
    """LeanK's training programs (dense and scaled with unit factors) give the sliding model's own
    hidden states after a prompt longer than the window, and the plan it learns decodes as the
    masked reference."""
    model = make_tiny_model("mistral", sliding_window=WINDOW, vocab_size=256)
    tokenizer, text = byte_level_tokenizer(), calibration_text()[:20000]
    training = LeanKTraining(stage1_steps=4, stage2_steps=2, lr=0.1, lengths=(384,), tasks=("passkey",))
    shape = kvcompile.ModelShape.from_config(model.config)
    program = kvcompile.capture(model)
    trainer = leank._Trainer(canonical_program(program, Plan.from_k_channels({})), shape, 0.5, 4, 0, 0, training,
                             tokenizer, text)
    prompt, answer = _prompt(1, 12, seed=1), _prompt(1, 5, seed=2)
    with torch.no_grad():
        want = model(torch.cat([prompt, answer], 1), output_hidden_states=True).hidden_states[-1][:, -5:]
        cache = leank._prefill(trainer.dense, shape, prompt)
        torch.testing.assert_close(leank._run(trainer.dense, answer, 12, cache), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leank._run(trainer.scaled, answer, 12, cache), want, atol=1e-5, rtol=1e-5)

    recipe = Recipe(k_sparsity=0.5, align=4, k_method="leank", leank=training)
    plan = kvcompile.calibrate(model, recipe, [text], tokenizer=tokenizer, program=program, progress=False)
    assert plan.meta["method"] == "leank" and sorted(plan.k_channels) == [0, 1]
    tm = kvcompile.transform(model, plan, program=program)
    _assert_decodes_as_the_masked_reference(tm, model, plan.k_channels, _prompt(2, 9, seed=8), steps=6, rtol=0)
