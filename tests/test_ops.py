"""The reference kvcompile:: ops against independent formulations (SDPA on repeated heads,
channels zeroed instead of gathered), and their fake implementations against the real ones."""

import pytest
import torch
import torch.nn.functional as F

import kvcompile.kernels  # noqa: F401

ops = torch.ops.kvcompile
B, HQ, HKV, S, T, D = 2, 6, 3, 4, 9, 16


def _causal_mask(s=S, t=T, batch=B):
    # bottom-right aligned, as HF builds it for a chunk appended to a past of t - s tokens
    q_pos = torch.arange(t - s, t)[:, None]
    return (torch.arange(t)[None, :] <= q_pos).expand(batch, 1, s, t)


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


# --------------------------------------------------------------------------------------------------
# caches written in place: per-row lengths instead of a mask

CAPACITY = 9
# per query count S, each row's token count (every row holds at least its S new tokens); the
# longest row stays below CAPACITY, so every row has garbage slots after it
RAGGED = {1: [5, 2, 7], 3: [5, 3, 7]}
GARBAGE = {"nan": float("nan"), "huge": 1e30}


def _with_garbage(x, lengths, fill):
    """x (B, H, C, d) with the slots at or beyond each row's length overwritten by `fill`."""
    beyond = torch.arange(x.shape[2]) >= torch.as_tensor(lengths)[:, None]
    return x.masked_fill(beyond[:, None, :, None], fill)


def _ragged_qkv(s):
    g = torch.Generator().manual_seed(3)
    batch = len(RAGGED[s])
    q = torch.randn(batch, HQ, s, D, generator=g) * 2
    k = torch.randn(batch, HKV, CAPACITY, D, generator=g) * 2
    v = torch.randn(batch, HKV, CAPACITY, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("s", [1, 3])
def test_attention_with_lengths_equals_each_row_alone(s, garbage):
    q, k, v = _ragged_qkv(s)
    lengths = torch.tensor(RAGGED[s])
    out = ops.attention(q, _with_garbage(k, lengths, garbage), _with_garbage(v, lengths, garbage), None, 0.3, False,
                        lengths)
    for b, n in enumerate(RAGGED[s]):
        row = slice(b, b + 1)
        want = ops.attention(q[row], k[row, :, :n], v[row, :, :n], _causal_mask(s, n, 1), 0.3, False)
        torch.testing.assert_close(out[row], want)


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("s", [1, 3])
def test_pruned_attention_with_lengths_equals_each_row_alone(s, garbage):
    q, k, v = _ragged_qkv(s)
    lengths = torch.tensor(RAGGED[s])
    heads, channels = [torch.tensor([0, 2])], [torch.tensor([[0, 3, 4, 9], [1, 2, 5, 6]])]  # head 1 keeps nothing
    k_groups = [ops.gather_kv_channels(k, h, c) for h, c in zip(heads, channels)]
    garbage_k = [_with_garbage(x, lengths, garbage) for x in k_groups]
    out = ops.pruned_attention(q, garbage_k, heads, channels, _with_garbage(v, lengths, garbage), None, 0.3, False,
                               lengths)
    for b, n in enumerate(RAGGED[s]):
        row = slice(b, b + 1)
        want = ops.pruned_attention(q[row], [x[row, :, :n] for x in k_groups], heads, channels, v[row, :, :n],
                                    _causal_mask(s, n, 1), 0.3, False)
        torch.testing.assert_close(out[row], want)


# per query count S, each row's (window tokens, middle tokens): a row with no middle yet, and
# windows holding the sink and the S new tokens after it
RAGGED_WINDOWS = {1: [(5, 3), (3, 0), (7, 5)], 3: [(6, 3), (5, 0), (7, 5)]}
WINDOW_SINK, WINDOW_CAPACITY, MIDDLE_CAPACITY = 2, 8, 6


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("kept", WINDOW_KEPT.values(), ids=WINDOW_KEPT.keys())
@pytest.mark.parametrize("s", [1, 3])
def test_windowed_attention_with_lengths_equals_each_row_alone(s, kept, garbage):
    """Row b's sequence of window + middle tokens, split at the sink as a cache of that one row
    would be and attended with the old sequence-order mask, against all rows in capacity-sized
    regions with garbage after each row's tokens."""
    g = torch.Generator().manual_seed(4)
    rows = RAGGED_WINDOWS[s]
    q = torch.randn(len(rows), HQ, s, D, generator=g) * 2
    per_row, want = [], []
    for b, (window, middle) in enumerate(rows):
        k = torch.randn(1, HKV, window + middle, D, generator=g) * 2
        v = torch.randn(1, HKV, window + middle, D, generator=g)
        inputs = _windowed_inputs(k, v, kept, WINDOW_SINK, middle)
        per_row.append(inputs)
        want.append(ops.windowed_attention(q[b : b + 1], *inputs, _causal_mask(s, window + middle, 1), 0.3, False,
                                           WINDOW_SINK))
    window_lengths = torch.tensor([window for window, _ in rows])
    middle_lengths = torch.tensor([middle for _, middle in rows])

    def stacked(tensors, capacity, lengths):
        """One input of every row, padded to `capacity` slots, with garbage after each row's tokens."""
        padded = [F.pad(x, (0, 0, 0, capacity - x.shape[2])) for x in tensors]
        return _with_garbage(torch.cat(padded), lengths, garbage)

    k_window, v_window, k_middle, heads, channels, v_middle = zip(*per_row)
    out = ops.windowed_attention(
        q,
        stacked(k_window, WINDOW_CAPACITY, window_lengths),
        stacked(v_window, WINDOW_CAPACITY, window_lengths),
        [stacked(group, MIDDLE_CAPACITY, middle_lengths) for group in zip(*k_middle)],
        heads[0],
        channels[0],
        stacked(v_middle, MIDDLE_CAPACITY, middle_lengths),
        None, 0.3, False, WINDOW_SINK, window_lengths, middle_lengths,
    )  # fmt: skip
    torch.testing.assert_close(out, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_lengths_replace_the_mask():
    q, k, v = _ragged_qkv(1)
    lengths = torch.tensor(RAGGED[1])
    with pytest.raises(ValueError, match="kvcompile::attention"):
        ops.attention(q, k, v, _causal_mask(1, CAPACITY, 3), 0.3, False, lengths)
    with pytest.raises(ValueError, match="kvcompile::attention"):
        ops.attention(q, k, v, None, 0.3, True, lengths)
    with pytest.raises(ValueError, match="kvcompile::pruned_attention"):
        ops.pruned_attention(q, [], [], [], v, _causal_mask(1, CAPACITY, 3), 0.3, False, lengths)
    window_args = (q, k, v, [], [], [], v[:, :0], None, 0.3, False, 0)
    with pytest.raises(ValueError, match="kvcompile::windowed_attention.*mask"):
        ops.windowed_attention(*window_args[:7], _causal_mask(1, CAPACITY, 3), *window_args[8:], lengths, lengths)
    with pytest.raises(ValueError, match="kvcompile::windowed_attention.*every lengths argument"):
        ops.windowed_attention(*window_args, lengths)


def test_lengths_outside_the_capacity_or_below_the_queries_are_refused():
    q, k, v = _ragged_qkv(3)
    with pytest.raises(ValueError, match=r"lengths must lie in \[3, 9\]"):
        ops.attention(q, k, v, None, 0.3, False, torch.tensor([5, 2, 7]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[3, 9\]"):
        ops.pruned_attention(q, [], [], [], v, None, 0.3, False, torch.tensor([5, 10, 7]))


def test_write_cache_writes_exactly_the_slots():
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(2, HKV, CAPACITY, 4, generator=g)
    new = torch.randn(2, HKV, 2, 4, generator=g)
    slots = torch.tensor([[4, 5], [0, 8]])  # a row appending after 4 tokens, one writing out of order
    before = cache.clone()
    assert ops.write_cache(cache, new, slots) is None
    want = before.clone()
    for b in range(2):
        for i in range(2):
            want[b, :, slots[b, i]] = new[b, :, i]
    torch.testing.assert_close(cache, want, rtol=0, atol=0)  # the written slots, and nothing else moved
    torch.library.opcheck(ops.write_cache.default, (before.clone(), new, slots))


def test_write_cache_survives_dead_code_elimination():
    # it returns nothing, so only its mutable schema keeps a call in the graph
    graph = torch.fx.Graph()
    cache, new, slots = graph.placeholder("cache"), graph.placeholder("new"), graph.placeholder("slots")
    graph.call_function(ops.write_cache.default, (cache, new, slots))
    graph.output(None)
    graph.eliminate_dead_code()
    assert ops.write_cache.default in [node.target for node in graph.nodes]


def test_fake_implementations_agree_with_reference_with_lengths():
    q, k, v = _ragged_qkv(3)
    lengths = torch.tensor(RAGGED[3])
    heads, channels = torch.tensor([1]), torch.tensor([[0, 4]])
    k_group = ops.gather_kv_channels(k, heads, channels)
    torch.library.opcheck(ops.attention.default, (q, k, v, None, 0.25, False, lengths))
    torch.library.opcheck(ops.pruned_attention.default, (q, [k_group], [heads], [channels], v, None, 0.25, False,
                                                         lengths))
    middle_lengths = torch.tensor([0, 4, 2])
    torch.library.opcheck(ops.windowed_attention.default, (q, k, v, [k_group[:, :, :4]], [heads], [channels],
                                                           v[:, 1:2, :4], None, 0.25, False, 2, lengths,
                                                           middle_lengths))
