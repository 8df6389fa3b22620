"""prune_k_channels: the programs' cache signature and numbers, per phase."""

import pytest
import torch
from kvcompile.passes import PassError, prune_k_channels_decode

from kvcompile import Plan
from kvcompile.program import signature_of
from tests.programs import pipeline
from tests.tiny_models import make_tiny_model

# layer 0: widths 8, 4 and a head keeping nothing is impossible with 2 heads, so layer 1 has one
PLAN = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [5, 6, 12, 13]], 1: [[], [1, 3, 5, 7]]})


@pytest.fixture(scope="module")
def programs():
    return pipeline(make_tiny_model("llama"), PLAN)


def test_signatures_name_each_width_group(programs):
    prefill = signature_of(programs["prune_k_channels.prefill"])
    decode = signature_of(programs["prune_k_channels.decode"])
    groups = ["key.0.w8", "key.0.w4", "key.1.w4"]
    assert prefill.inputs == ["input_ids", "position_ids", "past_key.0", "past_key.1", "past_value.0", "past_value.1"]
    assert prefill.outputs == ["logits"] + [f"present_{g}" for g in groups] + ["present_value.0", "present_value.1"]
    assert decode.inputs == ["input_ids", "position_ids"] + [f"past_{g}" for g in groups] + ["past_value.0", "past_value.1"]
    assert decode.outputs == prefill.outputs


def _inputs(batch, seq, past, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    pos = torch.arange(past, past + seq).expand(batch, -1)
    return [ids, pos] + [torch.randn(batch, heads, past, width, generator=g) for heads, width in shapes]


def test_prefill_program_is_dense_and_writes_gathered_keys(programs):
    dense = programs["canonicalize_attention"](*_inputs(2, 6, 0, [(2, 16)] * 4))
    pruned = dict(zip(signature_of(programs["prune_k_channels.prefill"]).outputs,
                      programs["prune_k_channels.prefill"](*_inputs(2, 6, 0, [(2, 16)] * 4))))
    torch.testing.assert_close(pruned["logits"], dense[0])
    full_key_0, full_key_1 = dense[1], dense[2]
    torch.testing.assert_close(pruned["present_key.0.w8"], full_key_0[:, :1, :, [0, 1, 2, 3, 8, 9, 10, 11]])
    torch.testing.assert_close(pruned["present_key.0.w4"], full_key_0[:, 1:, :, [5, 6, 12, 13]])
    torch.testing.assert_close(pruned["present_key.1.w4"], full_key_1[:, 1:, :, [1, 3, 5, 7]])


def test_decode_program_extends_each_group(programs):
    decode = programs["prune_k_channels.decode"]
    shapes = [(1, 8), (1, 4), (1, 4), (2, 16), (2, 16)]
    inputs = _inputs(3, 2, 5, shapes)
    outputs = dict(zip(signature_of(decode).outputs, decode(*inputs)))
    assert outputs["logits"].shape == (3, 2, 128)
    for (heads, width), name, past in zip(shapes, signature_of(decode).outputs[1:], inputs[2:]):
        assert outputs[name].shape == (3, heads, 7, width), name
        torch.testing.assert_close(outputs[name][:, :, :5], past)


def test_needs_canonical_sites(programs):
    with pytest.raises(PassError, match="layer 0: prune_k_channels_decode needs canonical sites"):
        prune_k_channels_decode(programs["captured"], PLAN)
