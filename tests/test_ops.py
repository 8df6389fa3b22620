"""The reference kvcompile:: ops against independent formulations (SDPA on repeated heads,
channels zeroed instead of gathered), and their fake implementations against the real ones."""

import pytest
import torch
import torch.nn.functional as F

import kvcompile.kernels  # noqa: F401

ops = torch.ops.kvcompile
B, HQ, HKV, S, T, D = 2, 6, 3, 4, 9, 16


def _causal_mask():
    # bottom-right aligned, as HF builds it for a chunk appended to a past of T - S tokens
    q_pos = torch.arange(T - S, T)[:, None]
    return (torch.arange(T)[None, :] <= q_pos).expand(B, 1, S, T)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, S, D, generator=g) * 2
    k = torch.randn(B, HKV, T, D, generator=g) * 2
    v = torch.randn(B, HKV, T, D, generator=g)
    return q, k, v


def _sdpa(q, k, v, mask=None, scale=None, is_causal=False):
    r = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), attn_mask=mask, scale=scale, is_causal=is_causal
    )


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_matches_sdpa_on_repeated_heads(qkv, mask_kind):
    q, k, v = qkv
    mask = {"none": None, "bool": _causal_mask(), "float": torch.randn(B, 1, S, T)}[mask_kind]
    out = ops.attention(q, k, v, mask, 0.3, False)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask, 0.3))


def test_attention_is_causal_follows_sdpa(qkv):
    q, k, v = qkv
    k, v = k[:, :, :S], v[:, :, :S]
    torch.testing.assert_close(ops.attention(q, k, v, None, 0.25, True), _sdpa(q, k, v, None, 0.25, True))


def test_gather_kv_channels_picks_heads_and_channels(qkv):
    _, k, _ = qkv
    heads = torch.tensor([2, 0])
    channels = torch.tensor([[1, 5, 9], [0, 2, 15]])
    out = ops.gather_kv_channels(k, heads, channels)
    assert out.shape == (B, 2, T, 3) and out.is_contiguous()
    for g, head in enumerate(heads.tolist()):
        for j, c in enumerate(channels[g].tolist()):
            torch.testing.assert_close(out[:, g, :, j], k[:, head, :, c])


def _zeroed_reference(q, k, v, kept, mask, scale):
    """Dense attention where each query head's non-kept channels are zero (keys untouched)."""
    r = q.shape[1] // k.shape[1]
    keep = torch.zeros(q.shape[1], q.shape[-1], dtype=torch.bool)
    for kv_head, ids in enumerate(kept):
        keep[kv_head * r : (kv_head + 1) * r, list(ids)] = True
    return _sdpa(q * keep[None, :, None, :], k, v, mask, scale)


@pytest.mark.parametrize("with_mask", [False, True])
def test_pruned_attention_equals_zeroed_channel_attention(qkv, with_mask):
    q, k, v = qkv
    kept = [(0, 3, 4, 9), (), (1, 2, 5, 6)]  # head 1 keeps nothing: uniform attention
    groups = [(torch.tensor([0, 2]), torch.tensor([kept[0], kept[2]]))]
    k_groups = [ops.gather_kv_channels(k, heads, channels) for heads, channels in groups]
    mask = _causal_mask() if with_mask else None
    out = ops.pruned_attention(
        q, k_groups, [h for h, _ in groups], [c for _, c in groups], v, mask, D**-0.5, False
    )
    torch.testing.assert_close(out, _zeroed_reference(q, k, v, kept, mask, D**-0.5), atol=1e-5, rtol=1e-5)


def test_pruned_attention_with_several_widths(qkv):
    q, k, v = qkv
    kept = [tuple(range(16)), (4, 7), (0, 1, 2, 3, 8, 9, 10, 11)]
    groups = [(torch.tensor([h]), torch.tensor([kept[h]])) for h in range(3)]
    k_groups = [ops.gather_kv_channels(k, heads, channels) for heads, channels in groups]
    out = ops.pruned_attention(q, k_groups, [h for h, _ in groups], [c for _, c in groups], v, None, 0.2, False)
    torch.testing.assert_close(out, _zeroed_reference(q, k, v, kept, None, 0.2), atol=1e-5, rtol=1e-5)


def test_fake_implementations_agree_with_reference(qkv):
    q, k, v = qkv
    heads, channels = torch.tensor([1]), torch.tensor([[0, 4]])
    torch.library.opcheck(ops.attention.default, (q, k, v, _causal_mask(), 0.25, False))
    torch.library.opcheck(ops.gather_kv_channels.default, (k, heads, channels))
    k_group = ops.gather_kv_channels(k, heads, channels)
    torch.library.opcheck(ops.pruned_attention.default, (q, [k_group], [heads], [channels], v, None, 0.25, False))


def test_merge_heads_is_the_group_row_vector_times_down(qkv):
    _, k, _ = qkv  # (B, 3, T, 16)
    groups = torch.tensor([[2, 0]])
    down = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(1))
    out = ops.merge_heads(k, groups, down)
    want = torch.cat([k[:, 2], k[:, 0]], dim=-1) @ down[0]
    torch.testing.assert_close(out[:, 0], want)
    torch.library.opcheck(ops.merge_heads.default, (k, groups, down))


def test_project_heads_picks_and_maps_each_head(qkv):
    q, _, _ = qkv
    heads = torch.tensor([5, 0, 0])
    weight = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(2))
    out = ops.project_heads(q, heads, weight)
    for i, head in enumerate(heads.tolist()):
        torch.testing.assert_close(out[:, i], q[:, head] @ weight[i])
    torch.library.opcheck(ops.project_heads.default, (q, heads, weight))
