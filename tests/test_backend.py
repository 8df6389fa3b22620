"""torch.compile(model, backend="kvcompile", options={"plan": plan}) against kvcompile.transform and
the masked reference (the HF model with the dropped query channels zeroed at decode)."""

import pytest
import torch

import kvcompile
from kvcompile import Plan
from kvcompile.capture import CACHE_NAME
from kvcompile.plan import LayerMerge
from tests.masked_reference import decode, masked_reference_decode
from tests.test_update_projections import random_updates
from tests.tiny_models import ARCHITECTURES, make_tiny_model, slow_unless

STEPS = 12
# different sets and counts per head; layer 1 has a head keeping nothing
PRUNE = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]})


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled graphs and counters of earlier tests would count here
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _prompt(batch=2, length=9, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy(model, prompt, steps=STEPS):
    """The HF calling convention, as the issue's users write it: last-position logits and tokens."""
    out = model(prompt, use_cache=True)
    logits, tokens = [out.logits[:, -1]], []
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        tokens.append(token)
        out = model(token, use_cache=True, **{CACHE_NAME: getattr(out, CACHE_NAME)})
        logits.append(out.logits[:, -1])
    return logits, torch.cat(tokens, dim=1)


def test_import_registers_the_backend():
    assert "kvcompile" in torch._dynamo.list_backends()


@pytest.mark.parametrize("arch", slow_unless(ARCHITECTURES, default=("llama", "phi3")))
def test_compiled_model_matches_transform_and_masked_reference(arch):
    model = make_tiny_model(arch)
    prompt = _prompt()
    compiled = torch.compile(model, backend="kvcompile", options={"plan": PRUNE, "inductor": False})
    got_logits, got_tokens = _greedy(compiled, prompt)
    want_logits, want_tokens = _greedy(kvcompile.transform(model, PRUNE), prompt)
    ref_logits, ref_tokens = masked_reference_decode(model, prompt, PRUNE.k_channels, steps=STEPS)
    for got, want, ref in zip(got_logits, want_logits, ref_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert torch.equal(got_tokens, want_tokens) and torch.equal(got_tokens, ref_tokens[:, :STEPS])
    # the plan changed the decode: the dense model's logits on the same tokens differ
    dense_logits, _ = decode(model, prompt, next_tokens=got_tokens, steps=STEPS)
    assert max((d - g).abs().max() for d, g in zip(dense_logits[1:], got_logits[1:])) > 1e-2


def test_inductor_parity_and_bounded_recompiles():
    """Through inductor: equal to transform. Dynamo compiles while shapes first vary (prefill, first
    decode with static shapes, decode with a dynamic cache length, prefill with a dynamic prompt
    length, and on torch 2.13 one more decode for the cache strides the dynamic prefill returns);
    after two prompts, a third prompt of another length and its decode compile nothing new."""
    model = make_tiny_model("llama")
    compiled = torch.compile(model, backend="kvcompile", options={"plan": PRUNE})
    tm = kvcompile.transform(model, PRUNE)
    graphs = []
    for length in (9, 13, 17):
        prompt = _prompt(length=length, seed=length)
        got_logits, got_tokens = _greedy(compiled, prompt)
        want_logits, want_tokens = _greedy(tm, prompt)
        for got, want in zip(got_logits, want_logits):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert torch.equal(got_tokens, want_tokens)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == 3 and graphs[1] <= 6 and graphs[2] == graphs[1], graphs


def test_decode_graph_attends_with_the_pruned_op():
    graphs = []

    def spy(gm, example_inputs):
        return kvcompile.backend.kvcompile_backend(gm, example_inputs, options={"plan": PRUNE, "inductor": False})

    def record(gm, example_inputs):
        graphs.append(gm)
        return spy(gm, example_inputs)

    _greedy(torch.compile(make_tiny_model("llama"), backend=record), _prompt(), steps=1)
    prefill, decode_graph = graphs
    targets = lambda gm: [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert torch.ops.kvcompile.pruned_attention.default not in targets(prefill)
    assert targets(decode_graph).count(torch.ops.kvcompile.pruned_attention.default) == 2
    assert torch.nn.functional.scaled_dot_product_attention not in targets(decode_graph)


def test_the_users_model_and_plan_are_untouched():
    model = make_tiny_model("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    _greedy(torch.compile(model, backend="kvcompile", options={"plan": PRUNE, "inductor": False}), _prompt(), steps=2)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    # the uncompiled model still runs densely
    torch.testing.assert_close(model(_prompt()).logits, make_tiny_model("llama")(_prompt()).logits)


def _compile_error(plan, **options):
    compiled = torch.compile(make_tiny_model("llama"), backend="kvcompile", options={"plan": plan, **options})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        _greedy(compiled, _prompt(), steps=1)
    return str(info.value)


def _merge_both_heads():
    down, up = torch.zeros(1, 32, 16), torch.zeros(1, 16, 32)
    return LayerMerge(groups=((0, 1),), heads_per_group=1, rope="commute", key_down=down, key_up=up,
                      value_down=down, value_up=up)


@pytest.mark.parametrize(
    "plan, message",
    [
        (Plan.from_k_channels({0: [[0, 1]]}), "layer 0, field k_channels: plan lists 1 KV heads, model has 2"),
        (Plan.from_k_channels({0: [[0, 16], [1]]}), "layer 0, KV head 0, field k_channels: channel 16 out of range"),
        (Plan.from_k_channels({5: [[0], [1]]}), "plan layer 5: model has 2 layers (0..1)"),
        (PRUNE.with_windows(sink=4, recent=8), "fields sink=4, recent=8"),
        (PRUNE.with_merges({0: _merge_both_heads()}), "field merges"),
        (PRUNE.with_updates(random_updates(make_tiny_model("llama"), [1])),
         "field updates: the plan updates the attention projections of layers [1]"),
    ],
)
def test_bad_plans_are_named(plan, message):
    assert message in _compile_error(plan, inductor=False)


def test_missing_plan_and_unknown_options():
    assert "needs options={'plan': plan}" in _compile_error(None)
    assert "unknown kvcompile backend options ['fast']" in _compile_error(PRUNE, fast=True)
    assert "cuda_graphs='mine': expected one of ['inductor', 'kvcompile']" in _compile_error(PRUNE, cuda_graphs="mine")
