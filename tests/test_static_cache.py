"""The compiled model on its compressed cache (kvcompile.cache_for) against kvcompile.transform:
the same logits and tokens for pruned and merged plans, the plan's bytes, transformers' generate
with a padded batch, and clear errors where the cache is misused."""

import ast
import functools
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import kvcompile
from kvcompile import PlanError
from kvcompile.calibration.recipe import Recipe
from kvcompile.capture import CACHE_NAME
from tests.test_backend import PRUNE, _greedy, _prompt
from tests.test_update_projections import random_updates
from tests.tiny_models import ARCHITECTURES, make_tiny_model, slow_unless

STEPS = 12


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@functools.cache
def _calibrated(arch: str, rope: str, k_sparsity: float | None) -> kvcompile.Plan:
    chunks = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    extra = {} if k_sparsity is None else {"k_sparsity": k_sparsity, "align": 4}
    return kvcompile.calibrate(make_tiny_model(arch), Recipe(kv_group_size=2, rope=rope, **extra), chunks, progress=False)


# windows of a few tokens, so that a dozen steps move tokens to the middle several times
WINDOWS = {"sink": 2, "recent": 4, "buffer": 3}
PLANS = {
    "pruned": lambda arch: PRUNE,
    "windowed": lambda arch: PRUNE.with_windows(**WINDOWS),
    "windowed-merged-post-pruned": lambda arch: _calibrated(arch, "post", 0.5).with_windows(**WINDOWS),
    "merged-post-pruned": lambda arch: _calibrated(arch, "post", 0.5),
    "merged-post": lambda arch: _calibrated(arch, "post", None),
    "merged-commute": lambda arch: _calibrated(arch, "commute", None),
    # a healed plan: low-rank updates of q, k, v and o in every layer (factors on the cache)
    "healed-windowed-merged-post-pruned": lambda arch: _healed(_calibrated(arch, "post", 0.5).with_windows(**WINDOWS), arch),
    "healed-merged-commute": lambda arch: _healed(_calibrated(arch, "commute", None), arch),
}


def _healed(plan: kvcompile.Plan, arch: str) -> kvcompile.Plan:
    model = make_tiny_model(arch)
    return plan.with_updates(random_updates(model, range(model.config.num_hidden_layers)))


# QK-norm (Qwen3) sits between the key projection and RoPE: commute plans do not fold there
CASES = [(arch, kind) for arch in ARCHITECTURES for kind in PLANS if not (arch == "qwen3" and kind.endswith("merged-commute"))]
DEFAULT_CASES = (("llama", "windowed-merged-post-pruned"), ("phi3", "merged-commute"),
                 ("phi3", "healed-windowed-merged-post-pruned"), ("qwen3", "healed-windowed-merged-post-pruned"))


def _compiled_greedy(model, plan, prompt, inductor=False):
    cache = kvcompile.cache_for(model, plan, batch_size=prompt.shape[0], max_cache_len=prompt.shape[1] + STEPS + 1)
    compiled = torch.compile(model, backend="kvcompile", options={"plan": plan, "inductor": inductor})
    with torch.no_grad():
        out = compiled(prompt, use_cache=True, **{CACHE_NAME: cache})
        logits, tokens = [out.logits[:, -1]], []
        for _ in range(STEPS):
            tokens.append(logits[-1].argmax(-1, keepdim=True))
            out = compiled(tokens[-1], use_cache=True, **{CACHE_NAME: cache})
            assert out.past_key_values is cache
            logits.append(out.logits[:, -1])
    return logits, torch.cat(tokens, dim=1), cache


@pytest.mark.parametrize("arch, kind", slow_unless(CASES, default=DEFAULT_CASES))
def test_compiled_on_the_compressed_cache_matches_transform(arch, kind):
    model = make_tiny_model(arch)
    plan = PLANS[kind](arch)
    prompt = _prompt()
    got_logits, got_tokens, cache = _compiled_greedy(model, plan, prompt)
    want_logits, want_tokens = _greedy(kvcompile.transform(model, plan), prompt, steps=STEPS)
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, **_tolerance(plan))
    assert torch.equal(got_tokens, want_tokens)
    batch, length = prompt.shape[0], prompt.shape[1] + STEPS
    assert cache.row_lengths == [length] * batch
    assert cache.nbytes == plan.cache_nbytes(cache.shape, torch.float32, batch, length)


def test_a_healed_plan_through_inductor_matches_transform():
    """The low-rank branches and the merge maps compiled by inductor: transform's logits within 1e-4."""
    model = make_tiny_model("llama")
    plan = PLANS["healed-merged-commute"]("llama")
    got_logits, got_tokens, _ = _compiled_greedy(model, plan, _prompt(), inductor=True)
    want_logits, want_tokens = _greedy(kvcompile.transform(model, plan), _prompt(), steps=STEPS)
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tokens, want_tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the prompt's and decode's


def test_inductor_and_transformers_generate_with_a_padded_batch():
    """`model.generate(**inputs, past_key_values=cache)` under the compiled forward: left padding of
    different lengths per row, transform's tokens; one prompt graph and one decode graph. The plan
    prunes and windows (a row's sink is its first real tokens, not its padding)."""
    model = make_tiny_model("llama")
    plan = PRUNE.with_windows(sink=3, recent=2, buffer=2)
    ids = _prompt(batch=3, length=11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
    want = kvcompile.transform(model, plan).generate(ids, attention_mask=mask, max_new_tokens=10)
    cache = kvcompile.cache_for(model, plan, batch_size=3, max_cache_len=24)
    compiled = torch.compile(model.forward, backend="kvcompile", options={"plan": plan})
    model.forward = compiled  # how transformers' docs compile a model that generates
    # the assertions below read the code inductor generates now: a cached graph written by an older
    # kvcompile would be served as is (inductor's cache key does not cover custom ops' tags)
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            got, codes = run_and_get_code(model.generate, input_ids=ids, attention_mask=mask, **{CACHE_NAME: cache},
                                          max_new_tokens=10, do_sample=False)
    finally:
        del model.forward
    assert torch.equal(got, want)
    assert cache.row_lengths == (mask.sum(1) + 9).tolist()  # the last token is returned, not cached
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    (decode,) = [code for code in codes if "windowed_attention" in code]
    _assert_each_write_input_made_once(decode, model.config.num_hidden_layers)
    # the mask grows a column a step, yet the decode step reads only its last one: compiled for
    # that column, it has static shapes (no size symbol in its code), so CUDA graphs replay it
    assert re.findall(r"\b(?:s|ks|u)\d+\b", decode) == []


TURN_PADDINGS = {"left": [[1, 1, 1, 1], [0, 0, 1, 1]], "right": [[1, 1, 0, 0], [1, 1, 1, 0]],
                 "between": [[0, 1, 0, 1], [1, 0, 1, 1]]}


@pytest.mark.parametrize(("kind", "padding"), [("pruned", "left"), ("merged-post-pruned", "left"),
                                               ("healed-merged-commute", "left"), ("merged-post-pruned", "right"),
                                               ("pruned", "between")])
def test_a_padded_continuation_matches_transform_on_its_tokens_left_padded(kind, padding):
    """A padded batch's prompts, then a next turn padded as `padding` says (the mask (B, P + S) as
    transformers builds it), then greedy steps: at each real token, the logits transform gives for
    the same real tokens left-padded (the padding transform takes there), and its row counts;
    transformers' positions come from the mask, as generate makes them."""
    model = make_tiny_model("llama")
    plan = PLANS[kind]("llama")
    ids, mask = _prompt(batch=2, length=7), torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    turn, turn_mask = _prompt(batch=2, length=4, seed=3), torch.tensor(TURN_PADDINGS[padding])
    order = torch.argsort(turn_mask, dim=1, stable=True)  # the same real tokens in order, their padding first
    left, left_mask = turn.gather(1, order), turn_mask.gather(1, order)
    tm = kvcompile.transform(model, plan)
    held = tm(ids, attention_mask=mask).past_key_values
    cache = kvcompile.cache_for(model, plan, batch_size=2, max_cache_len=7 + 4 + STEPS)
    compiled = torch.compile(model, backend="kvcompile", options={"plan": plan, "inductor": False})
    with torch.no_grad():
        compiled(ids, attention_mask=mask, position_ids=_positions(mask), **{CACHE_NAME: cache})
        padded = torch.cat([mask, turn_mask], dim=1)
        got = compiled(turn, attention_mask=padded, position_ids=_positions(padded)[:, -4:], **{CACHE_NAME: cache}).logits
        mask = torch.cat([mask, left_mask], dim=1)
        want = tm(left, attention_mask=mask, past_key_values=held).logits
        torch.testing.assert_close(got[turn_mask.bool()], want[left_mask.bool()], **_tolerance(plan))
        assert cache.row_lengths == held.row_lengths == mask.sum(1).tolist()
        for _ in range(STEPS // 2):
            token = want[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            got = compiled(token, attention_mask=mask, position_ids=_positions(mask)[:, -1:], **{CACHE_NAME: cache}).logits
            want = tm(token, past_key_values=held).logits
            torch.testing.assert_close(got, want, **_tolerance(plan))


def _tolerance(plan) -> dict:
    """How close the lowered sites' logits are to transform's: transform folds merges into the
    projections' weights, the sites apply the same maps to their outputs, equal up to fp32 rounding
    (relative 1e-5 of logits of size ~10). Updates add x a^T b^T beside the weight where transform
    rounds W + b a once: the tolerance of test_update_projections, which compares transform with
    hand-updated weights."""
    return dict(atol=3e-5, rtol=1e-4) if plan.updates else dict(atol=1e-5, rtol=1e-5)


def _positions(mask):
    """transformers' position_ids under padding (generate's): real tokens counted, padding at 1."""
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)


def _assert_each_write_input_made_once(code: str, layers: int) -> None:
    """Each layer's new key goes to several entries (each width group's kept channels, the window),
    and every layer writes at the same slots: inductor's code computes each once and hands the one
    buffer to every write, not a copy per use (on a GPU, a kernel each per layer and step)."""
    writes = [ast.parse(call).body[0].value for call in re.findall(r"torch\.ops\.kvcompile\.write_tokens\.default\(.*", code)]
    assert len(writes) == layers
    assert any(len(write.args[0].elts) > 3 for write in writes)  # some layer writes its key to 3+ entries
    for write in writes:  # (caches, sources, heads, channels, slots)
        assert len({ast.unparse(source) for source in write.args[1].elts}) == 2  # its new key and value
    assert len({ast.unparse(slots) for write in writes for slots in write.args[4].elts}) == 2  # middle, window


def test_the_cache_is_reset_and_reused_without_recompiling():
    model = make_tiny_model("llama")
    cache = kvcompile.cache_for(model, PRUNE, batch_size=2, max_cache_len=40)
    compiled = torch.compile(model, backend="kvcompile", options={"plan": PRUNE, "inductor": False})
    tm = kvcompile.transform(model, PRUNE)
    for length in (9, 13):
        cache.reset()
        prompt = _prompt(length=length, seed=length)
        with torch.no_grad():
            out = compiled(prompt, **{CACHE_NAME: cache})
            out = compiled(out.logits[:, -1:].argmax(-1), **{CACHE_NAME: cache})
        want = tm(prompt)
        want = tm(want.logits[:, -1:].argmax(-1), past_key_values=want.past_key_values)
        torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-6)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cache.reset()
    with torch.no_grad():
        compiled(_prompt(length=17, seed=17), **{CACHE_NAME: cache})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # dynamic prompt length by now


def test_the_cache_outside_the_backend_says_where_it_runs():
    model = make_tiny_model("llama")
    cache = kvcompile.cache_for(model, PRUNE, batch_size=2, max_cache_len=32)
    with pytest.raises(RuntimeError, match="only the kvcompile backend attends over"):
        model(_prompt(), **{CACHE_NAME: cache})


def test_a_cache_of_another_plan_is_refused_by_name():
    model = make_tiny_model("llama")
    other = kvcompile.Plan.from_k_channels({0: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    cache = kvcompile.cache_for(model, other, batch_size=2, max_cache_len=32)
    compiled = torch.compile(model, backend="kvcompile", options={"plan": PRUNE, "inductor": False})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=f"made for plan {other.fingerprint()}"):
        compiled(_prompt(), **{CACHE_NAME: cache})


@pytest.mark.parametrize(
    "plan, options, error, message",
    [
        (kvcompile.Plan.from_k_channels({}), {}, PlanError, "plan is empty"),
        (kvcompile.Plan.from_k_channels({0: [[0, 1]]}), {}, PlanError, "layer 0, field k_channels: plan lists 1 KV heads"),
        (PRUNE, {"batch_size": 0}, ValueError, "batch_size must be a positive int"),
        (PRUNE, {"max_cache_len": 2.5}, ValueError, "max_cache_len must be a positive int"),
    ],
)
def test_cache_for_checks_the_plan_as_transform_does(plan, options, error, message):
    with pytest.raises(error, match=message):
        kvcompile.cache_for(make_tiny_model("llama"), plan, **{"batch_size": 2, "max_cache_len": 32, **options})


def test_a_windowed_cache_continues_one_token_at_a_time():
    model = make_tiny_model("llama")
    plan = PRUNE.with_windows(**WINDOWS)
    cache = kvcompile.cache_for(model, plan, batch_size=2, max_cache_len=32)
    compiled = torch.compile(model, backend="kvcompile", options={"plan": plan, "inductor": False})
    with torch.no_grad():
        compiled(_prompt(), **{CACHE_NAME: cache})
        with pytest.raises(ValueError, match=r"adds one token per row \(got 2\)"):
            compiled(_prompt(length=2), **{CACHE_NAME: cache})


def test_a_prompt_longer_than_the_cache_is_refused():
    model = make_tiny_model("llama")
    cache = kvcompile.cache_for(model, PRUNE, batch_size=2, max_cache_len=8)
    compiled = torch.compile(model, backend="kvcompile", options={"plan": PRUNE, "inductor": False})
    with pytest.raises(ValueError, match="9 tokens do not fit the cache's max_cache_len of 8"):
        compiled(_prompt(length=9), **{CACHE_NAME: cache})


def test_a_decode_graph_reads_weights_and_the_cache_in_place_and_copies_the_step_s_tokens():
    """What CUDA graphs of the backend's decode step (graphs.ReplayedCalls) read where it is, and what
    they copy into their own inputs before each replay: the inputs' classification, on the CPU."""
    from kvcompile.backend import kvcompile_backend, static_inputs

    model = make_tiny_model("llama")
    cache = kvcompile.cache_for(model, PRUNE, batch_size=2, max_cache_len=40)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append((static_inputs(gm, example_inputs), list(example_inputs)))
        return kvcompile_backend(gm, example_inputs, options={"plan": PRUNE, "inductor": False})

    compiled = torch.compile(model, backend=recording_backend)
    token = torch.tensor([[5], [7]])
    with torch.no_grad():
        compiled(_prompt(), **{CACHE_NAME: cache})
        compiled(token, **{CACHE_NAME: cache})
    static, inputs = graphs[-1]  # the decode step's
    kept = {t.data_ptr() for t in [*model.parameters(), *model.buffers(), cache.lengths, cache.positions]}
    kept |= {t.data_ptr() for layer in cache.layers for t in [*layer.entries.values(), *layer.constants.values()]}
    assert static == [t.data_ptr() in kept for t in inputs]
    assert [t.data_ptr() for t, s in zip(inputs, static) if not s][0] == token.data_ptr()
    assert sum(static) >= len(list(model.parameters())) + sum(len(layer.entries) for layer in cache.layers)


def test_replayed_calls_call_inductor_s_code_as_dynamo_does():
    """A key's first call runs the compiled graph as it is (on the CPU too): with its inputs unpacked,
    as dynamo calls a backend's callable, whatever `_boxed_call` inductor's wrapper carries."""
    from torch._inductor.compile_fx import compile_fx

    from kvcompile.graphs import ReplayedCalls

    def backend(gm, example_inputs):
        return ReplayedCalls(compile_fx(gm, example_inputs), static=[False] * len(example_inputs))

    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: (x @ y).relu() + 1, backend=backend)
    x, y = torch.randn(3, 3), torch.randn(3, 3)
    try:
        torch.testing.assert_close(compiled(x, y), (x @ y).relu() + 1)
    finally:
        torch._dynamo.reset()
