"""KV-head merging end to end: calibrate -> transform, against the original model where the merge
is exact, against a plain transformers checkpoint of the merged model, and on its error messages."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvcompile
from kvcompile import Plan, Recipe, calibrate
from kvcompile.passes import MergeError
from kvcompile.plan import LayerMerge
from tests.masked_reference import decode, masked_reference_decode
from tests.tiny_models import ARCHITECTURES, WITHOUT_ROPE, make_tiny_model, slow_unless

D = 16
CHUNKS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))


def _duplicate_heads(model, group_size=2):
    """Make every KV head equal to the first of its group (keys and values): the group's keys then
    have rank <= d, so one merged head represents them exactly."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
                for h in range(param.shape[0] // D):
                    first = h - h % group_size
                    param[h * D : (h + 1) * D] = param[first * D : (first + 1) * D]
    return model


def _duplicate_fused(model, group_size=2):
    """Phi-3: K and V rows sit after the Q rows of the fused qkv projection."""
    q_rows, kv = model.config.num_attention_heads * D, model.config.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.self_attn.qkv_proj.weight
            for start in (q_rows, q_rows + kv * D):
                for h in range(kv):
                    first = h - h % group_size
                    weight[start + h * D : start + (h + 1) * D] = weight[start + first * D : start + (first + 1) * D]
    return model


def _exactly_mergeable(arch):
    model = make_tiny_model(arch)
    return _duplicate_fused(model) if arch == "phi3" else _duplicate_heads(model)


def _run(tm, prompt, tokens):
    out = tm(prompt)
    logits = [out.logits[:, -1]]
    for step in range(tokens.shape[1]):
        out = tm(tokens[:, step : step + 1], past_key_values=out.past_key_values)
        logits.append(out.logits[:, -1])
    return logits, out.past_key_values


def _assert_reproduces(model, tm, atol=1e-4):
    prompt = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    want, tokens = decode(model, prompt, steps=8)
    got, cache = _run(tm, prompt, tokens)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4)
    return cache


MODES = [(arch, rope) for arch in ARCHITECTURES for rope in ("commute", "post") if (arch, rope) != ("qwen3", "commute")]


@pytest.mark.parametrize("arch, rope", slow_unless(MODES + [("opt", "commute")],
                                                   default=[("llama", "commute"), ("qwen3", "post"), ("opt", "commute")]))
def test_exactly_representable_merge_reproduces_the_model(arch, rope):
    model = _exactly_mergeable(arch)
    plan = calibrate(model, Recipe(kv_group_size=2, kv_heads_per_group=1, rope=rope), CHUNKS, progress=False)
    expected_mode = "none" if arch in WITHOUT_ROPE else rope
    assert {merge.rope for merge in plan.merges.values()} == {expected_mode}
    assert max(e["key"] for e in plan.meta["merge_relative_error"].values()) < 1e-6
    tm = kvcompile.transform(model, plan)
    cache = _assert_reproduces(model, tm)
    heads = 1 if arch not in WITHOUT_ROPE else 2
    assert cache.entries["key.0"].shape[1] == heads  # half the KV heads, half the cache
    assert cache.nbytes == plan.cache_nbytes(tm.shape, torch.float32, batch=2, length=18)


def test_two_heads_per_group_is_exact_for_any_weights():
    # OPT has 4 KV heads: groups of 4 -> 2 heads of 2·d channels; keys of rank <= 2·d are exact
    model = _duplicate_heads(make_tiny_model("opt"), group_size=2)
    plan = calibrate(model, Recipe(kv_group_size=4, kv_heads_per_group=2), CHUNKS, progress=False)
    cache = _assert_reproduces(model, kvcompile.transform(model, plan))
    assert cache.entries["key.1"].shape[1:] == (1, 18, 2 * D)


@pytest.mark.parametrize("rope", ["commute", "post"])
def test_reconstruction_error_falls_as_merged_heads_grow(rope):
    model = make_tiny_model("opt", num_layers=1)
    errors = [
        calibrate(model, Recipe(kv_group_size=4, kv_heads_per_group=s, rope=rope), CHUNKS, progress=False)
        .meta["merge_relative_error"]["0"]
        for s in (1, 2, 3)
    ]
    for part in ("key", "value"):
        assert errors[0][part] > errors[1][part] > errors[2][part] > 0


def test_commute_and_post_fold_differently_but_both_follow_their_bases():
    model = make_tiny_model("llama")
    post = calibrate(model, Recipe(kv_group_size=2, rope="post"), CHUNKS, progress=False)
    commute = calibrate(model, Recipe(kv_group_size=2, rope="commute"), CHUNKS, progress=False)
    errors = lambda plan: [e["key"] for e in plan.meta["merge_relative_error"].values()]
    # SVD of post-RoPE keys is optimal; the commuting basis is constrained
    assert all(p <= c + 1e-9 for p, c in zip(errors(post), errors(commute)))
    # the commute program has no run-time projection; post projects queries and keys
    ops = lambda tm: {n.target for n in tm.decode_program.graph.nodes if n.op == "call_function"}
    assert torch.ops.kvcompile.merge_heads.default not in ops(kvcompile.transform(model, commute))
    assert torch.ops.kvcompile.merge_heads.default in ops(kvcompile.transform(model, post))


def test_commute_mode_refuses_bases_that_do_not_commute():
    model = make_tiny_model("llama")
    post = calibrate(model, Recipe(kv_group_size=2, rope="post"), CHUNKS, progress=False)
    wrong = {layer: LayerMerge(m.groups, 1, "commute", m.key_down, m.key_up, m.value_down, m.value_up)
             for layer, m in post.merges.items()}
    with pytest.raises(MergeError, match=r"layer 0 \(model.layers.0.self_attn\): key_down does not commute"):
        kvcompile.transform(model, Plan.from_k_channels({}).with_merges(wrong))


def test_commute_through_qk_norm_is_refused_with_advice():
    model = make_tiny_model("qwen3")
    plan = calibrate(model, Recipe(kv_group_size=2, rope="commute", merge_method="mean-pool"), CHUNKS, progress=False)
    with pytest.raises(MergeError, match="layer 0 .* per-head op such as QK-norm.*use rope='post'"):
        kvcompile.transform(model, plan)


def test_commute_plan_saves_a_plain_checkpoint_with_the_same_logits(tmp_path):
    model = make_tiny_model("qwen2")
    plan = calibrate(model, Recipe(kv_group_size=2, rope="commute"), CHUNKS, progress=False)
    tm = kvcompile.transform(model, plan)
    tm.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.num_key_value_heads == 1
    _assert_reproduces(plain, tm)
    # and merging really changed the model (these weights are not exactly mergeable)
    prompt = torch.randint(3, 128, (1, 10))
    assert (plain(prompt).logits - model(prompt).logits).abs().max() > 1e-3


def test_merge_then_prune_matches_the_masked_reference_of_the_merged_model(tmp_path):
    model = make_tiny_model("llama")
    recipe = Recipe(kv_group_size=2, rope="commute", k_sparsity=0.5, align=4)
    plan = calibrate(model, recipe, CHUNKS, progress=False)
    assert plan.kept_counts(0) == (8,)  # one merged head, half its 16 channels
    # the reference: the merged model as plain transformers, channels zeroed at decode
    merge_only = Plan.from_k_channels({}, model=plan.model).with_merges(plan.merges)
    kvcompile.transform(model, merge_only).save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    prompt = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    want, tokens = masked_reference_decode(merged, prompt, plan.k_channels, steps=8)
    got, cache = _run(kvcompile.transform(model, plan), prompt, tokens)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert cache.entries["key.0.w8"].shape == (2, 1, 18, 8)


def test_save_pretrained_refuses_what_a_checkpoint_cannot_hold():
    model = make_tiny_model("llama")
    post = calibrate(model, Recipe(kv_group_size=2, rope="post"), CHUNKS, progress=False)
    with pytest.raises(ValueError, match="layer 0 merges with rope='post'"):
        kvcompile.transform(model, post).save_pretrained("/nonexistent")


def test_recipe_errors_name_the_field():
    model = make_tiny_model("llama")
    for recipe, message in [
        (Recipe(), "asks for nothing"),
        (Recipe(kv_group_size=3), "divide the model's 2 KV heads"),
        (Recipe(kv_group_size=2, kv_heads_per_group=2), "kv_heads_per_group must be in 1..1"),
        (Recipe(kv_group_size=2, rope="pre"), "rope must be"),
        (Recipe(kv_group_size=2, merge_layers=(7,)), "merge_layers: layer 7 out of range"),
    ]:
        with pytest.raises(kvcompile.RecipeError, match=message):
            calibrate(model, recipe, CHUNKS, progress=False)
