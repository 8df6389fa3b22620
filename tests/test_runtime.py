"""transform() end to end against independent references: the original model for a plan keeping
everything, the masked reference (decode-step query channels zeroed) for a pruning plan."""

import copy

import pytest
import torch

import kvcompile
from kvcompile import CompressedKVCache, Plan, PlanError
from tests.masked_reference import decode, masked_reference_decode
from tests.tiny_models import ARCHITECTURES, make_tiny_model

STEPS = 20


def _keep_all(model):
    cfg = model.config
    return Plan.from_k_channels({layer: [list(range(16))] * 2 for layer in range(cfg.num_hidden_layers)})


# different sets and counts per head; layer 1 has a head keeping nothing
PRUNE = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]})


def _transformed_decode(tm, input_ids, next_tokens=None, steps=STEPS):
    """The masked_reference loop, run on the transformed model; also checks cache bytes each step."""
    out = tm(input_ids, use_cache=True)
    logits, fed = [out.logits[:, -1]], []
    for step in range(steps):
        _check_nbytes(tm, out.past_key_values)
        token = next_tokens[:, step] if next_tokens is not None else logits[-1].argmax(-1)
        fed.append(token)
        out = tm(token[:, None], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
    _check_nbytes(tm, out.past_key_values)
    return logits, torch.stack(fed, dim=1)


def _check_nbytes(tm, cache):
    expected = tm.plan.cache_nbytes(tm.shape, tm.dtype, cache.batch_size, cache.length)
    assert cache.nbytes == expected


def _prompt(batch, length=12, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keep_all_plan_reproduces_the_model(arch):
    model = make_tiny_model(arch)
    tm = kvcompile.transform(model, _keep_all(model))
    prompt = _prompt(2)
    want_logits, want_tokens = decode(model, prompt, steps=STEPS)
    got_logits, got_tokens = _transformed_decode(tm, prompt)
    for want, got in zip(want_logits, got_logits):
        # fp32: the pruned op sums q.k in another order than SDPA's kernel (logits here reach ~8)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch", [1, 3])
def test_pruning_plan_matches_masked_reference(arch, batch):
    model = make_tiny_model(arch)
    tm = kvcompile.transform(model, PRUNE)
    prompt = _prompt(batch, seed=batch)
    want_logits, want_tokens = masked_reference_decode(model, prompt, PRUNE.k_channels, steps=STEPS)
    got_logits, got_tokens = _transformed_decode(tm, prompt)
    # prefill attends densely: its logits are the original model's
    torch.testing.assert_close(got_logits[0], model(prompt).logits[:, -1], atol=1e-5, rtol=0)
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert torch.equal(got_tokens, want_tokens)
    # and pruning really changed the decode: the reference is not the dense model
    dense_logits, _ = decode(model, prompt, next_tokens=want_tokens, steps=STEPS)
    assert max((d - w).abs().max() for d, w in zip(dense_logits[1:], want_logits[1:])) > 1e-2


def test_cache_holds_exactly_the_planned_channels():
    model = make_tiny_model("llama")
    tm = kvcompile.transform(model, PRUNE)
    cache = tm(_prompt(2, length=7)).past_key_values
    shapes = {name: tuple(t.shape) for name, t in cache.entries.items()}
    assert shapes == {
        "key.0.w8": (2, 1, 7, 8),
        "key.0.w4": (2, 1, 7, 4),
        "key.1.w6": (2, 1, 7, 6),
        "value.0": (2, 2, 7, 16),
        "value.1": (2, 2, 7, 16),
    }
    assert cache.k_nbytes == 2 * 7 * (8 + 4 + 6) * 4
    dense_k = 2 * 7 * 2 * 2 * 16 * 4
    assert cache.k_nbytes < dense_k / 2


def test_layers_missing_from_the_plan_keep_all_channels():
    model = make_tiny_model("llama")
    plan = Plan.from_k_channels({1: [[0, 1], [2, 3]]})
    tm = kvcompile.transform(model, plan)
    cache = tm(_prompt(1)).past_key_values
    assert cache.entries["key.0"].shape == (1, 2, 12, 16)
    assert cache.entries["key.1.w2"].shape == (1, 2, 12, 2)


def test_the_cache_comes_as_past_key_values_or_as_cache():
    """Both names transformers releases use for the cache argument."""
    tm = kvcompile.transform(make_tiny_model("llama"), PRUNE)
    prompt, token = _prompt(2), _prompt(2, length=1, seed=1)
    by_old_name = tm(token, past_key_values=tm(prompt).past_key_values)
    by_new_name = tm(token, cache=tm(prompt).past_key_values)
    assert torch.equal(by_new_name.logits, by_old_name.logits)
    assert by_new_name.past_key_values.length == 13
    with pytest.raises(TypeError, match="as past_key_values or as cache, not both"):
        out = tm(prompt)
        tm(token, past_key_values=out.past_key_values, cache=out.past_key_values)


def test_generate_greedy_matches_the_reference_loop():
    model = make_tiny_model("qwen2")
    tm = kvcompile.transform(model, PRUNE)
    prompt = _prompt(2)
    _, want = masked_reference_decode(model, prompt, PRUNE.k_channels, steps=10)
    ids = tm.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(ids, torch.cat([prompt, want], dim=1))


def test_generate_stops_rows_at_eos():
    model = make_tiny_model("llama")
    tm = kvcompile.transform(model, PRUNE)
    prompt = _prompt(1)
    first = tm.generate(prompt, max_new_tokens=1, eos_token_id=None)[0, -1].item()
    ids = tm.generate(prompt, max_new_tokens=10, eos_token_id=first)
    assert ids.shape == (1, 13) and ids[0, -1].item() == first


def test_user_model_is_not_modified():
    model = make_tiny_model("phi3")
    before = copy.deepcopy(model.state_dict())
    attn = model.config._attn_implementation
    tm = kvcompile.transform(model, PRUNE)
    tm.generate(_prompt(1), max_new_tokens=4)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config._attn_implementation == attn
    assert not isinstance(model, kvcompile.TransformedModel)


@pytest.mark.parametrize(
    "plan, message",
    [
        (Plan.from_k_channels({5: [[0], [1]]}), "plan layer 5: model has 2 layers"),
        (Plan.from_k_channels({0: [[0], [1], [2]]}), "layer 0, field k_channels: plan lists 3 KV heads, model has 2"),
        (Plan.from_k_channels({1: [[0], [1, 99]]}), r"layer 1, KV head 1, field k_channels: channel 99 out of range"),
    ],
)
def test_bad_plans_fail_before_tracing_and_change_nothing(plan, message):
    model = make_tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match=message):
        kvcompile.transform(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_saved_for_another_model_is_rejected(tmp_path):
    big = make_tiny_model("llama", num_layers=3)
    plan = Plan.from_k_channels({2: [[0], [1]]}, model=kvcompile.ModelShape.from_config(big.config))
    plan.save(tmp_path / "p")
    with pytest.raises(PlanError, match="another model.*num_layers: plan 3, model 2"):
        kvcompile.transform(make_tiny_model("llama"), Plan.load(tmp_path / "p"))


def test_unsupported_inputs_are_refused_clearly():
    model = make_tiny_model("llama")
    tm = kvcompile.transform(model, PRUNE)
    with pytest.raises(TypeError, match="kvcompile.Plan"):
        kvcompile.transform(model, {0: [[0], [1]]})
    with pytest.raises(ValueError, match="training mode"):
        kvcompile.transform(make_tiny_model("llama").train(), PRUNE)
    with pytest.raises(ValueError, match="a row without tokens"):
        tm(_prompt(2), attention_mask=torch.tensor([[0] * 12, [1] * 12]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), input_ids \(2, 12\)"):
        tm(_prompt(2), attention_mask=torch.ones(2, 5))
    out = tm(_prompt(2))
    with pytest.raises(ValueError, match="batch 1, the cache holds batch 2"):
        tm(_prompt(1, length=1), past_key_values=out.past_key_values)
    with pytest.raises(TypeError, match="CompressedKVCache"):
        tm(_prompt(2, length=1), past_key_values=object())
    assert isinstance(out.past_key_values, CompressedKVCache)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_cache_encoder_writes_what_the_prefill_writes(arch):
    model = make_tiny_model(arch)
    assert_encoded_cache_is_the_prefill_cache(model, kvcompile.transform(model, PRUNE), _prompt(2), _prompt(2, length=1, seed=9))


def assert_encoded_cache_is_the_prefill_cache(model, tm, prompt, step):
    """`encode_dense_cache` of the dense model's cache equals the prefill program's cache, and decoding
    `step` from it gives the same logits."""
    compiled = tm(prompt).past_key_values
    dense = model(prompt, use_cache=True).past_key_values
    encoded = tm.encode_dense_cache([l.keys for l in dense.layers], [l.values for l in dense.layers])
    assert encoded.entries.keys() == compiled.entries.keys() and encoded.length == compiled.length
    for name, tensor in compiled.entries.items():
        torch.testing.assert_close(encoded.entries[name], tensor, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tm(step, past_key_values=encoded).logits, tm(step, past_key_values=compiled).logits)


@torch.no_grad()
def test_inductor_compiles_the_decode_program_with_its_cache_writes_in_place():
    """What CUDA graphs replay by default (graphs.py) is the decode program under torch.compile:
    through inductor a windowed step (cache writes, gathered channels, window + middle attention)
    gives the program's logits and writes the same tokens into the same buffers, none copied."""
    from kvcompile.program import call_program

    plan = PRUNE.with_windows(sink=2, recent=4, buffer=4)
    tm = kvcompile.transform(make_tiny_model("llama"), plan)
    out = tm(_prompt(2, length=15), max_cache_len=64)
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    inputs = cache.prepare_call(1)
    positions = cache.lengths[:, None]
    before = {name: buffer.clone() for name, buffer in cache.buffers.items()}
    want, _ = call_program(tm.decode_program, token, positions, cache.buffers, inputs)
    written = {name: buffer.clone() for name, buffer in cache.buffers.items()}
    for name, buffer in cache.buffers.items():
        buffer.copy_(before[name])
    addresses = {name: buffer.data_ptr() for name, buffer in cache.buffers.items()}

    compiled = torch.compile(tm.decode_program, fullgraph=True)
    got, _ = call_program(tm.decode_program, token, positions, cache.buffers, inputs, run=compiled)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert {name: buffer.data_ptr() for name, buffer in cache.buffers.items()} == addresses
    changed = [name for name in written if not torch.equal(written[name], before[name])]
    assert changed  # the step wrote tokens, so the comparison below can fail
    for name in written:
        torch.testing.assert_close(cache.buffers[name], written[name], atol=1e-5, rtol=1e-5)
