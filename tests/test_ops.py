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


def _per_column_reference(q, k, v, kept, sink, middle, mask, scale, is_causal):
    """Attention over the whole sequence k, v (B, Hkv, T, D), each key column scored on its own:
    the middle tokens [sink, sink + middle) with the query's non-kept channels zeroed (and not at
    all for a KV head keeping none), every other token with all channels. One plain softmax."""
    r = q.shape[1] // k.shape[1]
    keep = torch.zeros(q.shape[1], q.shape[-1], dtype=torch.bool)
    for kv_head, ids in enumerate(kept):
        keep[kv_head * r : (kv_head + 1) * r, list(ids)] = True
    streaming = torch.tensor([not ids for ids in kept]).repeat_interleave(r)[:, None, None]
    k_rep, v_rep = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    full = q @ k_rep.transpose(-1, -2) * scale
    pruned = (q * keep[None, :, None, :]) @ k_rep.transpose(-1, -2) * scale
    in_middle = torch.zeros(k.shape[2], dtype=torch.bool)
    in_middle[sink : sink + middle] = True
    scores = torch.where(in_middle, pruned, full).masked_fill(in_middle & streaming, float("-inf"))
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, -1) @ v_rep


def _windowed_inputs(k, v, kept, sink, middle):
    """The op's arguments for the sequence k, v split into window and middle, groups by width."""
    window = lambda x: torch.cat([x[:, :, :sink], x[:, :, sink + middle :]], dim=2)
    middle_k = k[:, :, sink : sink + middle]
    widths = sorted({len(ids) for ids in kept if ids}, reverse=True)
    heads = [torch.tensor([h for h, ids in enumerate(kept) if len(ids) == w]) for w in widths]
    channels = [torch.tensor([kept[h] for h in group.tolist()]) for group in heads]
    k_middle = [ops.gather_kv_channels(middle_k, h, c) for h, c in zip(heads, channels)]
    non_streaming = torch.tensor([h for h, ids in enumerate(kept) if ids], dtype=torch.long)
    v_middle = v[:, :, sink : sink + middle].index_select(1, non_streaming)
    return window(k), window(v), k_middle, heads, channels, v_middle


WINDOW_KEPT = {
    "streaming and one width": [(0, 3, 4, 9), (), (1, 2, 5, 6)],
    "three widths": [tuple(range(16)), (4, 7), (0, 1, 2, 3, 8, 9, 10, 11)],
    "all streaming": [(), (), ()],
}


@pytest.mark.parametrize("kept", WINDOW_KEPT.values(), ids=WINDOW_KEPT.keys())
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "is_causal"])
@pytest.mark.parametrize("sink, middle", [(2, 3), (0, 4), (3, 0)])
def test_windowed_attention_equals_per_column_scores(qkv, kept, mask_kind, sink, middle):
    q, k, v = qkv
    mask = {"none": None, "bool": _causal_mask(), "float": torch.randn(B, 1, S, T), "is_causal": None}[mask_kind]
    out = ops.windowed_attention(q, *_windowed_inputs(k, v, kept, sink, middle), mask, 0.3, mask_kind == "is_causal", sink)
    want = _per_column_reference(q, k, v, kept, sink, middle, mask, 0.3, mask_kind == "is_causal")
    # top-left causal with sink 0 leaves a streaming head's first rows nothing to attend: NaN, as in SDPA
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_windowed_attention_prunes_only_the_middle(qkv):
    # guards the reference itself: the middle's pruning and the streaming heads do change the result
    q, k, v = qkv
    kept = WINDOW_KEPT["streaming and one width"]
    windowed = _per_column_reference(q, k, v, kept, 2, 3, None, 0.3, False)
    dense = _per_column_reference(q, k, v, [tuple(range(D))] * HKV, 2, 3, None, 0.3, False)
    assert (windowed - dense).abs().amax(dim=(0, 2, 3)).min() > 1e-2  # every query head moved


def test_windowed_attention_fake_agrees_with_reference(qkv):
    q, k, v = qkv
    args = _windowed_inputs(k, v, WINDOW_KEPT["streaming and one width"], 2, 3)
    torch.library.opcheck(ops.windowed_attention.default, (q, *args, _causal_mask(), 0.25, False, 2))
