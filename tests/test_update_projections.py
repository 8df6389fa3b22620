"""A plan's low-rank projection updates (what healing trains): transformed with them, a model
computes what the same model with its attention weights changed by hand computes under the plan
without them, for every architecture and with K pruning, windows and merges; bad updates are refused
by layer and field, and the user's model is never touched."""

import copy

import pytest
import torch

import kvcompile
from kvcompile import Plan, PlanError, Recipe, calibrate
from kvcompile.passes import PassError
from kvcompile.plan import PROJECTIONS, LayerUpdate
from tests.tiny_models import ARCHITECTURES, WITHOUT_ROPE, make_tiny_model, slow_unless

PROMPT = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
CHUNKS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))


def random_updates(model, layers, names=PROJECTIONS, rank=3, seed=0) -> dict[int, LayerUpdate]:
    shape, hidden = kvcompile.ModelShape.from_config(model.config), model.config.hidden_size
    d = shape.head_dim
    heads = {"query": shape.num_heads, "key": shape.num_kv_heads, "value": shape.num_kv_heads, "output": shape.num_heads}
    generator = torch.Generator().manual_seed(seed)
    updates = {}
    for layer in layers:
        factors = {}
        for name in names:
            out, inp = heads[name] * d, hidden
            if name == "output":
                out, inp = inp, out
            factors[name] = (0.3 * torch.randn(out, rank, generator=generator),
                             0.3 * torch.randn(rank, inp, generator=generator))
        updates[layer] = LayerUpdate(factors)
    return updates


def _attention(model, layer):
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    return layers[layer].self_attn


def with_updated_weights(model, updates):
    """A copy of `model` whose attention weights carry `updates`, written from transformers' own
    module layout (the fused qkv rows of Phi-3 are q, then k, then v)."""
    changed = copy.deepcopy(model)
    shape = kvcompile.ModelShape.from_config(model.config)
    with torch.no_grad():
        for layer, update in updates.items():
            attn = _attention(changed, layer)
            for name in update.factors:
                delta = update.delta(name)
                if name == "output":
                    (getattr(attn, "o_proj", None) or attn.out_proj).weight += delta
                elif hasattr(attn, "qkv_proj"):
                    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
                    start = {"query": 0, "key": q, "value": q + kv}[name]
                    attn.qkv_proj.weight[start : start + delta.shape[0]] += delta
                else:
                    getattr(attn, {"query": "q_proj", "key": "k_proj", "value": "v_proj"}[name]).weight += delta
    return changed


def _decode_logits(tm, steps=6):
    out = tm(PROMPT)
    logits, token = [out.logits], out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = tm(token, past_key_values=out.past_key_values)
        logits.append(out.logits)
        token = out.logits[:, -1:].argmax(-1)
    return logits


def _assert_same_decode(model, plan, updates):
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    got = _decode_logits(kvcompile.transform(model, plan.with_updates(updates)))
    want = _decode_logits(kvcompile.transform(with_updated_weights(model, updates), plan))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert not torch.allclose(got[0], _decode_logits(kvcompile.transform(model, plan), steps=0)[0], atol=1e-3)


def _k_plan(model, keep=8):
    shape = kvcompile.ModelShape.from_config(model.config)
    generator = torch.Generator().manual_seed(1)
    return Plan.from_k_channels({layer: [sorted(torch.randperm(shape.head_dim, generator=generator)[:keep].tolist())
                                         for _ in range(shape.num_kv_heads)] for layer in range(shape.num_layers)})


# Llama's, Phi-3's (fused qkv) and OPT's (no RoPE, pre-scaled queries) layouts by default; the rest are slow
@pytest.mark.parametrize("arch", slow_unless(ARCHITECTURES + WITHOUT_ROPE, default=["llama", "phi3", "opt"]))
def test_updates_are_the_model_with_changed_weights_under_a_k_plan(arch):
    model = make_tiny_model(arch)
    updates = {**random_updates(model, [0]), **random_updates(model, [1], ("key", "output"), seed=1)}
    _assert_same_decode(model, _k_plan(model), updates)


def test_updates_with_windows_and_streaming_heads():
    model = make_tiny_model("llama")
    plan = Plan.from_k_channels({0: [[1, 5, 9], []], 1: [[0, 2], [3, 4, 15]]}).with_windows(sink=2, recent=4, buffer=2)
    _assert_same_decode(model, plan, random_updates(model, [0, 1]))


@pytest.mark.parametrize("rope", ["commute", "post"])
def test_updates_apply_before_a_merge_folds_the_weights(rope):
    model = make_tiny_model("llama")
    merged = calibrate(model, Recipe(kv_group_size=2, rope=rope), CHUNKS, progress=False)
    _assert_same_decode(model, merged, random_updates(model, [0, 1]))


def test_a_healed_commute_merge_still_saves_as_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    merged = calibrate(model, Recipe(kv_group_size=2, rope="commute"), CHUNKS, progress=False)
    tm = kvcompile.transform(model, merged.with_updates(random_updates(model, [0, 1])))
    tm.save_pretrained(tmp_path / "gqa")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gqa").eval()
    assert reloaded.config.num_key_value_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROMPT).logits, tm(PROMPT).logits, atol=2e-5, rtol=1e-4)


def test_a_plan_with_updates_saves_loads_and_fingerprints_them(tmp_path):
    model = make_tiny_model("llama")
    plan = _k_plan(model).with_updates(random_updates(model, [1], ("query", "value")))
    loaded = Plan.load(plan.save(tmp_path / "plan"))
    assert loaded.fingerprint() == plan.fingerprint() != _k_plan(model).fingerprint()
    assert sorted(loaded.updates[1].factors) == ["query", "value"]
    torch.testing.assert_close(loaded.updates[1].delta("value"), plan.updates[1].delta("value"))
    other = _k_plan(model).with_updates(random_updates(model, [1], ("query", "value"), seed=7))
    assert other.fingerprint() != plan.fingerprint()


def test_bad_updates_are_refused_by_layer_and_field():
    model = make_tiny_model("llama")
    plan = _k_plan(model)
    update = random_updates(model, [0])[0]
    b, a = update.factors["key"]
    with pytest.raises(PlanError, match=r"layer 0, field updates: key.b spans 64 head channels.* 2 heads of 16"):
        kvcompile.transform(model, plan.with_updates({0: LayerUpdate({"key": (torch.cat([b, b]), a)})}))
    with pytest.raises(PlanError, match=r"layer 0, field updates: expected updates of some of"):
        kvcompile.transform(model, plan.with_updates({0: LayerUpdate({"gate": (b, a)})}))
    with pytest.raises(PlanError, match=r"plan layer 5: model has 2 layers"):
        kvcompile.transform(model, plan.with_updates({5: update}))
    with pytest.raises(PassError, match=r"layer 1 \(model.layers.1.self_attn\), field updates: the key update is "):
        kvcompile.transform(model, plan.with_updates({1: LayerUpdate({"key": (b, a[:, :10])})}))


def test_a_plan_stored_in_bfloat16_updates_float32_weights_in_float32(tmp_path):
    model = make_tiny_model("llama")
    merged = calibrate(model, Recipe(kv_group_size=2, rope="commute"), CHUNKS, progress=False)
    plan = merged.with_updates(random_updates(model, [0, 1]))
    small = Plan.load(plan.with_float_dtype(torch.bfloat16).save(tmp_path / "bf16"))
    assert small.updates[0].factors["key"][0].dtype == torch.bfloat16 == small.merges[1].key_down.dtype
    assert small.fingerprint() not in (plan.fingerprint(), plan.with_float_dtype(torch.float16).fingerprint())
    assert small.updates[0].delta("key").dtype == torch.float32
    # the same plan with its tensors rounded to bfloat16, computed in float32
    rounded = plan.with_float_dtype(torch.bfloat16).with_float_dtype(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(kvcompile.transform(model, small)(PROMPT).logits,
                                   kvcompile.transform(model, rounded)(PROMPT).logits, atol=1e-5, rtol=1e-5)
