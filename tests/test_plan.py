import dataclasses
import json

import pytest
import torch

from kvcompile import ModelShape, Plan, PlanError
from kvcompile.calibration.leank import hard_mask

SHAPE = ModelShape(model_type="llama", num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16)


def test_from_k_channels_keeps_per_head_lists():
    plan = Plan.from_k_channels({1: [[0, 3, 5], []], 0: [list(range(16)), [2]]})
    assert list(plan.k_channels) == [0, 1]
    assert plan.k_channels[1] == ((0, 3, 5), ())
    assert plan.kept_counts(0) == (16, 1)


def test_tensor_channel_lists_are_accepted():
    plan = Plan.from_k_channels({0: [torch.tensor([1, 4]), torch.tensor([0])]})
    assert plan.k_channels[0] == ((1, 4), (0,))


@pytest.mark.parametrize(
    "channels, message",
    [
        ({0: [[3, 1], [0]]}, "layer 0, KV head 0, field k_channels: channels not sorted"),
        ({0: [[0], [2, 2]]}, "layer 0, KV head 1, field k_channels: channel 2 listed twice"),
        ({0: [[0], [-1]]}, "layer 0, KV head 1, field k_channels: channel -1 out of range"),
        ({0: [[0.5], [1]]}, "channel ids must be ints"),
        ({"0": [[0], [1]]}, "layer indices must be ints"),
        ({0: "01"}, "layer 0: expected a list of per-KV-head channel lists"),
    ],
)
def test_malformed_plans_are_rejected_with_location(channels, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_k_channels(channels)


@pytest.mark.parametrize(
    "channels, message",
    [
        ({2: [[0], [1]]}, r"plan layer 2: model has 2 layers \(0..1\)"),
        ({1: [[0], [1], [2]]}, "layer 1, field k_channels: plan lists 3 KV heads, model has 2"),
        ({0: [[0], [1, 16]]}, r"layer 0, KV head 1, field k_channels: channel 16 out of range \[0, 16\)"),
        ({}, "plan is empty"),
    ],
)
def test_validation_against_model_names_layer_head_field(channels, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_k_channels(channels).validate(SHAPE)


def test_plan_for_another_model_is_rejected():
    other = ModelShape(model_type="qwen2", num_layers=2, num_kv_heads=2, num_heads=8, head_dim=16)
    plan = Plan.from_k_channels({0: [[0], [1]]}, model=other)
    with pytest.raises(PlanError, match="another model.*num_heads: plan 8, model 4"):
        plan.validate(SHAPE)


def test_save_load_roundtrip_is_json_and_safetensors(tmp_path):
    plan = Plan.from_k_channels({0: [[0, 3, 5], []], 1: [[1], list(range(16))]}, model=SHAPE, meta={"recipe": "x"})
    directory = plan.save(tmp_path / "plan")
    assert sorted(p.name for p in directory.iterdir()) == ["plan.json", "tensors.safetensors"]
    document = json.loads((directory / "plan.json").read_text())
    assert document["k_channels"] == {"0": [3, 0], "1": [1, 16]}
    loaded = Plan.load(directory)
    assert loaded == plan
    assert loaded.fingerprint() == plan.fingerprint()


def test_load_rejects_non_plans(tmp_path):
    with pytest.raises(PlanError, match="no plan.json"):
        Plan.load(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(PlanError, match="not a kvcompile plan"):
        Plan.load(tmp_path)


def test_cache_formula_counts_kept_channels_and_full_layers():
    plan = Plan.from_k_channels({0: [[0, 3, 5], []]})
    # layer 0 keeps 3 + 0 channels, layer 1 is absent and keeps 2 * 16; V is never pruned here
    assert plan.k_bytes_per_token(SHAPE, torch.float32) == (3 + 32) * 4
    assert plan.v_bytes_per_token(SHAPE, torch.bfloat16) == 2 * 2 * 16 * 2
    assert plan.cache_nbytes(SHAPE, torch.float32, batch=3, length=10) == 3 * 10 * ((3 + 32) + 64) * 4


def _merge(groups=((0, 1),), s=1, d=16, rope="commute"):
    t = len(groups[0])
    g = torch.Generator().manual_seed(0)
    down = lambda: torch.randn(len(groups), t * d, s * d, generator=g)
    up = lambda: torch.randn(len(groups), s * d, t * d, generator=g)
    from kvcompile.plan import LayerMerge

    return LayerMerge(tuple(groups), s, rope, down(), up(), down(), up())


def test_merges_change_the_layer_shape_the_k_channels_index():
    plan = Plan.from_k_channels({1: [[0, 5]]}).with_merges({1: _merge()})
    plan.validate(SHAPE)  # one merged head of 16 channels in layer 1
    assert plan.kv_heads(1, SHAPE) == (1, 16) and plan.kv_heads(0, SHAPE) == (2, 16)
    # layer 0 keeps 2 heads x 16; layer 1: K keeps 2 channels, V one merged head of 16
    assert plan.k_bytes_per_token(SHAPE, torch.float32) == (32 + 2) * 4
    assert plan.v_bytes_per_token(SHAPE, torch.float32) == (32 + 16) * 4
    with pytest.raises(PlanError, match=r"layer 1, field k_channels: plan lists 2 KV heads, model has 1 \(after merging\)"):
        Plan.from_k_channels({1: [[0], [1]]}).with_merges({1: _merge()}).validate(SHAPE)


@pytest.mark.parametrize(
    "merge, message",
    [
        (_merge(groups=((0,), (1,))), "a group of 1 heads must become"),
        (_merge(groups=((0, 0),)), r"groups \[\(0, 0\)\] must cover KV heads 0..1 once each"),
        (_merge(s=2), "a group of 2 heads must become 1..1 heads, got 2"),
        (_merge(rope="pre"), "rope must be one of"),
        (_merge(d=8), r"key_down has shape \(1, 16, 8\), expected \(1, 32, 16\)"),
    ],
)
def test_bad_merges_are_named(merge, message):
    with pytest.raises(PlanError, match=f"layer 0, field merges: {message}"):
        Plan.from_k_channels({}).with_merges({0: merge}).validate(SHAPE)


def test_merges_roundtrip_through_safetensors(tmp_path):
    plan = Plan.from_k_channels({0: [[1, 2]]}).with_merges({0: _merge(rope="post")})
    loaded = Plan.load(plan.save(tmp_path / "p"))
    merge, again = plan.merges[0], loaded.merges[0]
    assert (again.groups, again.heads_per_group, again.rope) == (merge.groups, 1, "post")
    assert all(torch.equal(again.tensors()[k], v) for k, v in merge.tensors().items())
    assert loaded.fingerprint() == plan.fingerprint()
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["merges"]["0"]["groups"] == [[0, 1]]


WINDOWED = Plan.from_k_channels({0: [[0, 3, 5], []]}, sink=2, recent=4, buffer=4)


@pytest.mark.parametrize(
    "windows, message",
    [
        (dict(sink=-1), "field sink: expected a non-negative int, got -1"),
        (dict(recent="4"), "field recent: expected a non-negative int, got '4'"),
        (dict(recent=True), "field recent: expected a non-negative int, got True"),
        (dict(buffer=0), "field buffer: expected a positive int, got 0"),
        (dict(sink=1, buffer=2.0), "field buffer: expected a positive int, got 2.0"),
    ],
)
def test_bad_windows_name_the_field(windows, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_k_channels({0: [[0], [1]]}, **windows)
    with pytest.raises(PlanError, match=message):
        Plan.from_k_channels({0: [[0], [1]]}).with_windows(**{"sink": 0, "recent": 0, **windows})


def test_with_windows_returns_a_copy_that_merges_keep():
    plan = Plan.from_k_channels({1: [[0, 5]]})
    windowed = plan.with_windows(2, 4)
    assert (plan.sink, plan.recent, plan.windowed) == (0, 0, False)
    assert (windowed.sink, windowed.recent, windowed.buffer, windowed.windowed) == (2, 4, 128, True)
    assert windowed.with_windows(1, 1).buffer == 128 and windowed.with_windows(1, 1, buffer=8).buffer == 8
    merged = windowed.with_merges({1: _merge()})
    assert (merged.sink, merged.recent, merged.buffer) == (2, 4, 128)


def test_middle_length_moves_whole_buffers():
    # sink 2 + recent 4 stay in the window; the rest moves 4 tokens at a time
    assert [WINDOWED.middle_length(t) for t in (0, 5, 6, 9, 10, 13, 14)] == [0, 0, 0, 0, 4, 4, 8]
    assert Plan.from_k_channels({0: [[0], [1]]}).middle_length(13) == 13  # no windows: all middle
    assert WINDOWED.with_windows(0, 3, buffer=1).middle_length(10) == 7


def test_windowed_cache_formula_counts_window_middle_and_streaming_heads():
    # 14 tokens: middle 8, window 6. Layer 0: window K and V 2 heads x 16 each; middle K 3 channels,
    # middle V only head 0 (head 1 is streaming). Layer 1 is not planned: 2 x 16 for K and V, every token.
    window, middle = 6, 8
    layer_0 = window * 2 * (2 * 16) + middle * (3 + 16)
    layer_1 = 14 * 2 * (2 * 16)
    assert WINDOWED.cache_nbytes(SHAPE, torch.float32, batch=3, length=14) == 3 * (layer_0 + layer_1) * 4
    assert WINDOWED.v_bytes_per_token(SHAPE, torch.float32) == (16 + 32) * 4  # a middle token's V
    # short sequences are all window
    assert WINDOWED.cache_nbytes(SHAPE, torch.float16, batch=1, length=5) == 5 * 2 * 64 * 2


def test_windows_roundtrip_and_enter_the_fingerprint(tmp_path):
    loaded = Plan.load(WINDOWED.save(tmp_path / "w"))
    assert loaded == WINDOWED and (loaded.sink, loaded.recent, loaded.buffer) == (2, 4, 4)
    assert loaded.fingerprint() == WINDOWED.fingerprint()
    plain = Plan.from_k_channels({0: [[0, 3, 5], []]})
    fingerprints = {p.fingerprint() for p in (plain, WINDOWED, WINDOWED.with_windows(2, 5), WINDOWED.with_windows(2, 4, 8))}
    assert len(fingerprints) == 4


def test_plans_saved_before_windows_load_without_them(tmp_path):
    plain = Plan.from_k_channels({0: [[0, 3, 5], []]})
    directory = plain.save(tmp_path / "old")
    document = json.loads((directory / "plan.json").read_text())
    for name in ("sink", "recent", "buffer"):
        del document[name]
    (directory / "plan.json").write_text(json.dumps(document))
    loaded = Plan.load(directory)
    assert (loaded.sink, loaded.recent, loaded.windowed) == (0, 0, False)
    assert loaded == plain and loaded.fingerprint() == plain.fingerprint()


def test_k_and_v_bytes_split_the_cache_formula():
    # window tokens cost the same in K and V; the middle's K and V differ (kept channels, streaming heads)
    for length in (0, 5, 14, 100):
        k_bytes, v_bytes = WINDOWED.kv_nbytes(SHAPE, torch.float32, batch=2, length=length)
        assert k_bytes + v_bytes == WINDOWED.cache_nbytes(SHAPE, torch.float32, batch=2, length=length)
    middle = WINDOWED.middle_length(100)
    k_bytes, v_bytes = WINDOWED.kv_nbytes(SHAPE, torch.float32, batch=1, length=100)
    assert v_bytes - k_bytes == middle * (WINDOWED.v_bytes_per_token(SHAPE, torch.float32) - WINDOWED.k_bytes_per_token(SHAPE, torch.float32))


def test_importance_roundtrips_and_is_checked_against_the_model(tmp_path):
    factors = torch.rand(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim)
    plan = Plan.from_k_channels({0: [[0, 3, 5], []]}, importance=factors)
    loaded = Plan.load(plan.save(tmp_path / "p"))
    assert torch.equal(loaded.importance, factors)
    assert loaded.fingerprint() == Plan.from_k_channels({0: [[0, 3, 5], []]}).fingerprint()  # not applied: not hashed
    with pytest.raises(PlanError, match=r"field importance: shape \(1, 2, 16\), expected"):
        Plan.from_k_channels({0: [[0, 3, 5], []]}, importance=factors[:1]).validate(SHAPE)


def test_builtin_plans_list_load_and_fit_their_model():
    names = Plan.list_builtin()
    learned = {"smollm2-135m-instruct/leank-k50", "smollm2-135m-instruct/leank-k70"}
    healed = {"smollm2-135m-instruct/commute-3to2-healed", "smollm2-135m-instruct/leank-k70-healed"}
    assert learned | healed <= set(names)
    for name in healed:
        plan = Plan.load_builtin(name)
        plan.validate(plan.model)
        assert plan.meta["heal"]["steps"] > 0 and plan.meta["heal"]["final_loss"] < plan.meta["heal"]["initial_loss"]
        assert sorted(plan.updates) == list(range(plan.model.num_layers)) and plan.meta["stored_as"] == "bfloat16"
    assert (Plan.load_builtin("smollm2-135m-instruct/leank-k70-healed").k_channels
            == Plan.load_builtin("smollm2-135m-instruct/leank-k70").k_channels)
    for name in names:
        plan = Plan.load_builtin(name)
        plan.validate(plan.model)
        if not plan.k_channels:
            continue
        total = plan.model.num_layers * plan.model.num_kv_heads * plan.model.head_dim
        kept = sum(sum(plan.kept_counts(layer)) for layer in plan.k_channels)
        assert kept == round(total * (1 - plan.meta["sparsity"]) / plan.meta["align"]) * plan.meta["align"]
        assert all(n % plan.meta["align"] == 0 for layer in plan.k_channels for n in plan.kept_counts(layer))
        assert (plan.sink, plan.recent) == (plan.meta["sink"], plan.meta["recent"]) and plan.windowed
        assert plan.meta["final_loss"]["stage2"] is not None
        # the kept channels are the hard mask of the shipped factors
        mask = hard_mask(plan.importance, plan.meta["sparsity"], plan.meta["align"])
        assert all(list(plan.k_channels[layer][head]) == mask[layer, head].nonzero().flatten().tolist()
                   for layer in plan.k_channels for head in range(plan.model.num_kv_heads))
    with pytest.raises(PlanError, match="no built-in plan 'smollm2/leank-k99'; built-in plans: smollm2-135m-instruct/commute-3to2-healed, "
                       "smollm2-135m-instruct/leank-k50"):
        Plan.load_builtin("smollm2/leank-k99")


# layer 0 attends a sliding window of 4 tokens, layer 1 every token
SLIDING = ModelShape(model_type="gemma3_text", num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16,
                     sliding_windows=(4, None))


def test_sliding_layers_hold_their_window_minus_one_tokens():
    plan = Plan.from_k_channels({0: [[0, 3, 5], []], 1: [[1], [2, 4]]}, model=SLIDING)
    assert [plan.held_tokens(0, SLIDING, t) for t in (0, 2, 3, 50)] == [(0, 0), (2, 0), (3, 0), (3, 0)]
    assert plan.held_tokens(1, SLIDING, 50) == (50, 0)
    # 50 tokens: layer 0 holds 3 of them (K 3 channels, V 2 heads of 16), layer 1 all (K 3, V 32)
    k_bytes, v_bytes = plan.kv_nbytes(SLIDING, torch.float32, batch=2, length=50)
    assert (k_bytes, v_bytes) == (2 * (3 * 3 + 50 * 3) * 4, 2 * (3 * 32 + 50 * 32) * 4)
    # a model recorded without windows holds every token of every layer
    assert plan.cache_nbytes(SHAPE, torch.float32, 1, 50) == 50 * (6 + 64) * 4


def test_sliding_windows_roundtrip_and_windowed_plans_leave_sliding_layers_out(tmp_path):
    plan = Plan.from_k_channels({1: [[1], [2, 4]]}, model=SLIDING, sink=2, recent=4)
    plan.validate(SLIDING)  # the sliding layer is not planned: its window is all it keeps
    loaded = Plan.load(plan.save(tmp_path / "p"))
    assert loaded.model.sliding_windows == (4, None) and loaded == plan
    with pytest.raises(PlanError, match="layer 0, fields sink/recent: layer 0 attends a sliding window of 4 tokens"):
        Plan.from_k_channels({0: [[0], [1]]}, sink=2, recent=4).validate(SLIDING)
    # a plan whose model recorded no windows (saved before they were) still fits
    unrecorded = dataclasses.replace(SLIDING, sliding_windows=None)
    Plan.from_k_channels({1: [[1], [2, 4]]}, model=unrecorded).validate(SLIDING)
    document = json.loads((Plan.from_k_channels({0: [[0], [1]]}, model=unrecorded).save(tmp_path / "q") / "plan.json").read_text())
    assert "sliding_windows" not in document["model"]
