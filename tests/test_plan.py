import json

import pytest
import torch

from kvcompile import ModelShape, Plan, PlanError

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
