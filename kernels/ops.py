"""The kvcompile:: operators.

Each op is a `torch.library.custom_op` with a plain-PyTorch reference implementation (the truth
that faster implementations are tested against) and a fake implementation for tracing. Layouts:

    q            (B, Hq, S, D)   post-RoPE queries, Hq = r * Hkv (GQA: query head i uses KV head i // r)
    k, v         (B, Hkv, T, D)  the whole key/value sequence, past and new, T >= S
    mask         boolean (True = attend) or additive float, broadcastable to (B, Hq, S, T), or None
    k_groups[g]  (B, G_g, T, w_g) the keys of KV heads `heads[g]` (G_g,), keeping channels
                 `channels[g]` (G_g, w_g) of each: the compressed K cache of one width group

Windowed layout (`windowed_attention`): the sequence of T = Tw + M tokens is split into a window
(B, Hkv, Tw, D), every channel, holding the first `sink` tokens then the last Tw - sink, and a
middle of M tokens in between, whose keys come as width groups (B, G_g, M, w_g) and whose values
(B, Hm, M, D) cover only the KV heads of the groups (ascending). The mask is over the sequence
order: tokens 0..T-1.

Caches written in place: the runtime may allocate each cache tensor with a capacity C >= every
row's token count, write new tokens into it (`write_cache`), and keep each row's count in
`lengths` (B,) int64 on the device (rows of a padded batch hold different counts). Slots at or
beyond a row's count hold garbage and are never read. The attention ops take such lengths instead
of a mask: row b's keys are slots [0, lengths[b]), and its S queries are the last S of them (query
i sees slots j <= lengths[b] - S + i; at decode, S = 1, all of them). `windowed_attention` takes
one count per region: the window's (the same rule) and the middle's (every query sees all of it).

Rings (a sliding-window layer's cache, `window` > 0, with `lengths`): the C slots are a ring, token
t of row b in slot t % C, row b's tokens those before lengths[b]; query i (token lengths[b] - S +
i) sees the tokens in (its - window, its]. C >= window - 1 + S keeps every one of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Ops whose implementations read any strides: inductor may hand them views of its buffers as they
# are, where it would otherwise copy every input into the strides seen at trace time (a copy per
# use: one per cache entry a layer's new key is written to).
_ANY_STRIDES = (torch.Tag.flexible_layout,)


def masked_softmax_attention(scores, v, mask, is_causal):
    """softmax(scores + mask) @ v, scores (B, Hq, S, T) already scaled, v (B, Hkv, T, D)."""
    scores = scores + _sequence_bias(mask, is_causal, scores.shape, scores.device)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    b, hq, s, t = probs.shape
    hkv = v.shape[1]
    return _weighted_values(probs.reshape(b, hkv, hq // hkv, s, t), v).view(b, hq, s, -1)


@torch.library.custom_op("kvcompile::attention", mutates_args=(), tags=_ANY_STRIDES)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    lengths: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Dense GQA-native attention; K/V are not repeated. Matches SDPA with `scale`. With `lengths`
    (then mask None, is_causal False), row b attends over slots [0, lengths[b]) of k and v; with
    `window` too, over the rings k and v by the sliding rule (module docstring)."""
    return attention_reference(q, k, v, mask, scale, is_causal, lengths, window)


def attention_reference(q, k, v, mask, scale, is_causal, lengths=None, window=0):
    check_lengths_arguments("kvcompile::attention", q, mask, is_causal, lengths)
    if window:
        (k, v), mask = _ring_view("kvcompile::attention", lengths, [k, v], q.shape[2], window)
    elif lengths is not None:
        k, v = _cut_to_lengths("kvcompile::attention", lengths, [k, v], q.shape[2])
        mask = _length_mask(lengths, q.shape[2], k.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True)
    return out.contiguous()  # SDPA may return a transposed layout; the op's contract (its fake) is contiguous


@attention.register_fake
def _(q, k, v, mask, scale, is_causal, lengths=None, window=0):
    check_lengths_arguments("kvcompile::attention", q, mask, is_causal, lengths)
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("kvcompile::gather_kv_channels", mutates_args=())
def gather_kv_channels(x: torch.Tensor, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) -> (B, G, T, w): KV heads `heads` (G,), channels `channels[g]` of head g."""
    picked = x.index_select(1, heads)
    b, g, t, _ = picked.shape
    return picked.gather(-1, channels[None, :, None, :].expand(b, g, t, channels.shape[-1])).contiguous()


@gather_kv_channels.register_fake
def _(x, heads, channels):
    return x.new_empty(x.shape[0], heads.shape[0], x.shape[2], channels.shape[-1])


@torch.library.custom_op("kvcompile::pruned_attention", mutates_args=(), tags=_ANY_STRIDES)
def pruned_attention(
    q: torch.Tensor,
    k_groups: list[torch.Tensor],
    heads: list[torch.Tensor],
    channels: list[torch.Tensor],
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    lengths: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Attention whose scores use only the kept key channels.

    Every query head of a KV head's GQA group is gathered with that KV head's channels, so
    `q[idx] . k[idx]` is the score; `scale` stays the full head's. A KV head in no group keeps no
    channels: its scores are 0 and it attends uniformly over the unmasked keys. With `lengths`
    (then mask None, is_causal False), row b attends over slots [0, lengths[b]) of k_groups and v;
    with `window` too, over the rings k_groups and v by the sliding rule (module docstring).
    """
    return pruned_attention_reference(q, k_groups, heads, channels, v, mask, scale, is_causal, lengths, window)


def pruned_attention_reference(q, k_groups, heads, channels, v, mask, scale, is_causal, lengths=None, window=0):
    check_lengths_arguments("kvcompile::pruned_attention", q, mask, is_causal, lengths)
    if window:
        (*k_groups, v), mask = _ring_view("kvcompile::pruned_attention", lengths, [*k_groups, v], q.shape[2], window)
    elif lengths is not None:
        *k_groups, v = _cut_to_lengths("kvcompile::pruned_attention", lengths, [*k_groups, v], q.shape[2])
        mask = _length_mask(lengths, q.shape[2], v.shape[2])
    b, hq, s, d = q.shape
    hkv, t = v.shape[1], v.shape[2]
    r = hq // hkv
    scores = q.new_zeros(b, hkv, r, s, t, dtype=torch.float32)
    q_by_kv_head = q.view(b, hkv, r, s, d)
    for keys, group_heads, group_channels in zip(k_groups, heads, channels):
        g, w = group_channels.shape
        q_group = q_by_kv_head.index_select(1, group_heads)
        q_group = q_group.gather(-1, group_channels[None, :, None, None, :].expand(b, g, r, s, w))
        group_scores = _scores(q_group.float(), keys.float())
        scores.index_copy_(1, group_heads, group_scores)
    scores = (scores * scale).view(b, hq, s, t)
    return masked_softmax_attention(scores, v, mask, is_causal)


@pruned_attention.register_fake
def _(q, k_groups, heads, channels, v, mask, scale, is_causal, lengths=None, window=0):
    check_lengths_arguments("kvcompile::pruned_attention", q, mask, is_causal, lengths)
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("kvcompile::windowed_attention", mutates_args=(), tags=_ANY_STRIDES)
def windowed_attention(
    q: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    k_middle: list[torch.Tensor],
    heads: list[torch.Tensor],
    channels: list[torch.Tensor],
    v_middle: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    sink: int,
    window_lengths: torch.Tensor | None = None,
    middle_lengths: torch.Tensor | None = None,
    window_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """One softmax over LeanK's regions: window keys score with every channel, middle keys of
    group g with `channels[g]` only (original `scale`); KV heads in no group (streaming heads)
    see the window only.

    Computed the way a split-KV kernel does: a partial result (row max, sum of exponentials,
    unnormalised output) per region (the window, then each middle width group), combined by
    log-sum-exp. `mask` (bool or additive) and `is_causal` (top-left, like SDPA) refer to sequence
    order; window column j < `sink` is token j, the rest follow the middle.

    With `window_lengths` and `middle_lengths` (both; then mask None, is_causal False), row b's
    window is slots [0, window_lengths[b]), its S queries the last S of them (the causal rule of
    the module docstring), and its middle slots [0, middle_lengths[b]), seen by every query. The
    order of tokens no longer matters to the mask, so `sink` is ignored; except with `window_start`
    (B,), which makes the window's slots after the first `sink` a ring (a cache that never shifts
    its window, static_cache.py): logical window slot j >= sink is slot sink + (j - sink +
    window_start[b]) % (Tw - sink).
    """
    return windowed_attention_reference(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale,
                                        is_causal, sink, window_lengths, middle_lengths, window_start)


def windowed_attention_reference(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale, is_causal,
                                 sink, window_lengths=None, middle_lengths=None, window_start=None):
    op = "kvcompile::windowed_attention"
    check_lengths_arguments(op, q, mask, is_causal, window_lengths, middle_lengths)
    b, hq, s, d = q.shape
    if window_start is not None:
        if window_lengths is None:
            raise ValueError(f"{op}: window_start comes with window_lengths and middle_lengths")
        slots = torch.arange(k_window.shape[2], device=q.device)
        ring = sink + (slots - sink + window_start[:, None]) % (k_window.shape[2] - sink)
        logical = torch.where(slots < sink, slots, ring)[:, None, :, None]  # (B, 1, Tw, 1)
        k_window = k_window.gather(2, logical.expand(-1, k_window.shape[1], -1, k_window.shape[3]))
        v_window = v_window.gather(2, logical.expand(-1, v_window.shape[1], -1, v_window.shape[3]))
    if window_lengths is not None:
        k_window, v_window = _cut_to_lengths(op, window_lengths, [k_window, v_window], s)
        *k_middle, v_middle = _cut_to_lengths(op, middle_lengths, [*k_middle, v_middle], 0)
        # a mask over the order [middle, window] (so sink 0): every query sees the valid middle
        # (the mask of a single query, repeated), the window by the causal rule
        middle_mask = _length_mask(middle_lengths, 1, v_middle.shape[2]).expand(-1, -1, s, -1)
        mask = torch.cat([middle_mask, _length_mask(window_lengths, s, k_window.shape[2])], dim=-1)
        sink = 0
    hkv, window = k_window.shape[1], k_window.shape[2]
    middle = v_middle.shape[2]
    r = hq // hkv
    bias = _sequence_bias(mask, is_causal, (b, hq, s, window + middle), q.device).reshape(b, hkv, r, s, window + middle)
    # the sequence is [window[:sink], middle, window[sink:]]
    window_bias = torch.cat([bias[..., :sink], bias[..., sink + middle :]], dim=-1)
    middle_bias = bias[..., sink : sink + middle]

    q_by_kv_head = q.view(b, hkv, r, s, d).float()
    window_scores = _scores(q_by_kv_head, k_window.float()) * scale + window_bias
    partials = [_partial_attention(window_scores, v_window)]
    if heads:  # the middle: every group's scores in the rows of the heads v_middle holds, one partial
        middle_heads = torch.cat(heads).sort().values
        middle_scores = q_by_kv_head.new_empty(b, middle_heads.shape[0], r, s, middle)
        for keys, group_heads, group_channels in zip(k_middle, heads, channels):
            g, w = group_channels.shape
            q_group = q_by_kv_head.index_select(1, group_heads)
            q_group = q_group.gather(-1, group_channels[None, :, None, None, :].expand(b, g, r, s, w))
            middle_scores.index_copy_(1, torch.searchsorted(middle_heads, group_heads), _scores(q_group, keys.float()))
        middle_scores = middle_scores * scale + middle_bias.index_select(1, middle_heads)
        partials.append(_on_all_heads(_partial_attention(middle_scores, v_middle), middle_heads, hkv))
    return _combine_partials(partials).view(b, hq, s, -1).to(v_window.dtype)


def check_lengths_arguments(op: str, q, mask, is_causal, *lengths) -> None:
    """Raise ValueError, naming `op`, unless the per-row lengths (None, or (B,) int64/int32 each)
    are all given or all None, and when given come without a mask and without is_causal."""
    given = [x for x in lengths if x is not None]
    if not given:
        return
    if len(given) != len(lengths):
        raise ValueError(f"{op}: pass every lengths argument or none")
    if mask is not None or is_causal:
        raise ValueError(f"{op}: lengths replace the mask; pass mask=None and is_causal=False")
    for x in given:
        if x.shape != (q.shape[0],) or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{op}: lengths must be ({q.shape[0]},) int64 or int32, got {tuple(x.shape)} {x.dtype}")


def _cut_to_lengths(op, lengths, tensors, min_length) -> list[torch.Tensor]:
    """The (B, H, C, d) `tensors` cut to the longest row, max(lengths) (a host sync): views when
    every row has that length, else copies with each row's slots at or beyond its length zeroed:
    the mask keeps those slots out of the softmax, but garbage there would still reach the
    arithmetic (a NaN key or value survives 0 * NaN)."""
    capacity = min(x.shape[2] for x in tensors)
    shortest, longest = (int(x) for x in torch.aminmax(lengths))
    if shortest < min_length or longest > capacity:
        raise ValueError(f"{op}: lengths must lie in [{min_length}, {capacity}], got {lengths.tolist()}")
    if shortest == longest:  # no row has slots to hide: reading the tokens copies nothing
        return [x[:, :, :longest] for x in tensors]
    valid = torch.arange(longest, device=lengths.device) < lengths[:, None]  # (B, longest)
    return [x[:, :, :longest].masked_fill(~valid[:, None, :, None], 0) for x in tensors]


def _ring_view(op, lengths, tensors, s, window) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The (B, H, C, d) rings `tensors`, slots holding no token zeroed (garbage would reach the
    arithmetic, as in `_cut_to_lengths`), and the (B, 1, s, C) mask of the sliding rule."""
    if lengths is None:
        raise ValueError(f"{op}: a sliding window comes with lengths (its cache is a ring written in place)")
    capacity = min(x.shape[2] for x in tensors)
    if capacity < window - 1 + s:
        raise ValueError(f"{op}: a ring of {capacity} slots cannot hold the {window - 1 + s} tokens {s} queries with a "
                         f"window of {window} see")
    if int(lengths.min()) < s:
        raise ValueError(f"{op}: lengths must be at least the {s} queries, got {lengths.tolist()}")
    token = ring_tokens(lengths, capacity)
    held = token >= 0
    query = lengths[:, None] - s + torch.arange(s, device=lengths.device)  # (B, s)
    token, query = token[:, None, :], query[..., None]
    mask = held[:, None, :] & (token <= query) & (token > query - window)
    return [x[:, :, :capacity].masked_fill(~held[:, None, :, None], 0) for x in tensors], mask[:, None]


def ring_tokens(lengths: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, capacity): the token each slot of a ring holds in rows of `lengths` tokens, the latest
    t = slot (mod capacity) before the row's length; negative where none is yet."""
    slots = torch.arange(capacity, device=lengths.device)
    return slots + torch.div(lengths[:, None] - 1 - slots, capacity, rounding_mode="floor") * capacity


def _length_mask(lengths, s, t) -> torch.Tensor:
    """Boolean (B, 1, s, t): the s queries are the last s of row b's lengths[b] keys, so query i
    sees slots j <= lengths[b] - s + i (and never a slot at or beyond lengths[b])."""
    last_seen = lengths[:, None] - s + torch.arange(s, device=lengths.device)  # (B, s)
    return (torch.arange(t, device=lengths.device) <= last_seen[..., None])[:, None]


def _sequence_bias(mask, is_causal, shape, device) -> torch.Tensor:
    """The additive fp32 mask (0 where attended, -inf elsewhere, or the float mask) over (B, Hq, S, T)."""
    s, t = shape[-2:]
    bias = torch.zeros(s, t, device=device)
    if is_causal:  # SDPA's convention: top-left aligned, query i sees keys 0..i
        bias = bias.masked_fill(~torch.ones(s, t, dtype=torch.bool, device=device).tril(), float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask.float()
    return bias.broadcast_to(shape)


def _partial_attention(scores, v):
    """Softmax pieces of one region: scores (B, G, r, S, T_r) fp32, v (B, G, T_r, Dv) ->
    (unnormalised output (B, G, r, S, Dv), row max (.., 1), row sum of exp(score - max) (.., 1))."""
    if scores.shape[-1] == 0:  # an empty region (no middle yet): contributes nothing
        row_max = scores.new_full(scores.shape[:-1] + (1,), float("-inf"))
    else:
        row_max = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - _finite_or_zero(row_max))
    return _weighted_values(probs, v.float()), row_max, probs.sum(-1, keepdim=True)


def _on_all_heads(partial, heads, num_heads):
    """A partial of KV heads `heads` spread over all `num_heads` (the others contribute nothing)."""
    out, row_max, row_sum = partial
    spread = lambda x, fill: x.new_full((x.shape[0], num_heads, *x.shape[2:]), fill).index_copy(1, heads, x)
    return spread(out, 0.0), spread(row_max, float("-inf")), spread(row_sum, 0.0)


def _combine_partials(partials):
    """Log-sum-exp combination: sum_i e^(m_i - m) o_i / sum_i e^(m_i - m) l_i, m = max_i m_i."""
    row_max = torch.stack([m for _, m, _ in partials]).amax(0)
    weights = [torch.exp(m - _finite_or_zero(row_max)) for _, m, _ in partials]
    out = sum(w * o for w, (o, _, _) in zip(weights, partials))
    return out / sum(w * l for w, (_, _, l) in zip(weights, partials))


def _finite_or_zero(x):
    # a row with nothing to attend has max -inf; shifting by 0 instead keeps exp() from NaN
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


@windowed_attention.register_fake
def _(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale, is_causal, sink, window_lengths=None,
      middle_lengths=None, window_start=None):
    check_lengths_arguments("kvcompile::windowed_attention", q, mask, is_causal, window_lengths, middle_lengths)
    return q.new_empty(q.shape[:-1] + v_window.shape[-1:])


@torch.library.custom_op("kvcompile::write_cache", mutates_args=("cache",))
def write_cache(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
    """Write S new tokens into a cache in place: cache (B, H, C, w), new (B, H, S, w), slots (B, S)
    int64; cache[b, :, slots[b, i]] = new[b, :, i]. Other slots are left as they are. Declared
    mutating, so FX dead-code elimination keeps a call although it returns nothing."""
    cache.scatter_(2, _token_index(slots, new), new)


def cache_written(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`write_cache`'s result as a new tensor, `cache` unchanged: the write of a program that has no
    mutation (the ONNX export, where the runtime hands the output the input's memory)."""
    return cache.scatter(2, _token_index(slots, new), new)


def _token_index(slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """slots (B, S) as a scatter index over new's (B, H, S, w)."""
    return slots[:, None, :, None].expand(new.shape)


@write_cache.register_fake
def _(cache, new, slots):
    return None


@torch.library.custom_op("kvcompile::merge_heads", mutates_args=(), tags=_ANY_STRIDES)
def merge_heads(x: torch.Tensor, groups: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, d) -> (B, G, S, s·d): the heads `groups[g]` (t of them) concatenated per token
    and mapped by `down[g]` (t·d, s·d), as in bases.py's c = k_group @ down."""
    return merge_heads_reference(x, groups, down)


def merge_heads_reference(x, groups, down):
    """`merge_heads` in plain torch (differentiable: healing trains `down` through it)."""
    b, _, seq, d = x.shape
    num_groups, t = groups.shape
    grouped = x.index_select(1, groups.flatten()).view(b, num_groups, t, seq, d)
    return grouped.permute(0, 1, 3, 2, 4).reshape(b, num_groups, seq, t * d) @ down


@merge_heads.register_fake
def _(x, groups, down):
    return x.new_empty(x.shape[0], groups.shape[0], x.shape[2], down.shape[-1])


@torch.library.custom_op("kvcompile::project_heads", mutates_args=(), tags=_ANY_STRIDES)
def project_heads(x: torch.Tensor, heads: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, d) -> (B, H', S, d'): output head i is input head `heads[i]` times `weight[i]` (d, d')."""
    return x.index_select(1, heads) @ weight


@project_heads.register_fake
def _(x, heads, weight):
    return x.new_empty(x.shape[0], heads.shape[0], x.shape[2], weight.shape[-1])


@torch.library.custom_op("kvcompile::cache_site", mutates_args=())
def cache_site(
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    entries: list[torch.Tensor],
    constants: list[torch.Tensor],
    layer: int,
    plan: str,
    prompt: bool,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a layer's new post-RoPE key/value (B, Hkv, S, D) meet a `kvcompile.StaticCompressedCache`.

    Its cache layer returns this op's outputs to the model's attention in place of a dense K/V; the
    torch.compile backend replaces the op and that attention by the plan's writes into `entries`
    and the plan's attention over them (passes/cache_sites.py); `window`: the layer's sliding
    window (0: none). It has no computation of its own: run anywhere else, it says so."""
    raise RuntimeError(
        f"layer {layer}: a kvcompile.StaticCompressedCache holds its plan's compressed layout, which only the "
        "kvcompile backend attends over: run the model as torch.compile(model, backend='kvcompile', "
        "options={'plan': plan}), or use kvcompile.transform(model, plan) and the cache it returns"
    )


@cache_site.register_fake
def _(key, value, lengths, entries, constants, layer, plan, prompt, window):
    return key.new_empty(key.shape), value.new_empty(value.shape)


@torch.library.custom_op("kvcompile::write_tokens", mutates_args=("caches",), tags=_ANY_STRIDES)
def write_tokens(
    caches: list[torch.Tensor],
    sources: list[torch.Tensor],
    heads: list[torch.Tensor],
    channels: list[torch.Tensor],
    slots: list[torch.Tensor],
) -> None:
    """Write S new tokens into several caches at once: caches[i] (B, G_i, C_i, w_i) gets, in slot
    slots[i][b, s] of row g, channels channels[i][g] (G_i, w_i) of head heads[i][g] of sources[i]
    (B, H, S, D). One call per layer (all its entries), one kernel launch on CUDA."""
    write_tokens_reference(caches, sources, heads, channels, slots)


def write_tokens_reference(caches, sources, heads, channels, slots) -> None:
    for cache, source, head, channel, slot in zip(caches, sources, heads, channels, slots, strict=True):
        write_cache(cache, gather_kv_channels(source, head, channel), slot)


@write_tokens.register_fake
def _(caches, sources, heads, channels, slots):
    return None


# GQA without repeating K or V: the r query heads of a KV head are stacked as rows of one matrix
# product with that head's keys or values. A broadcast matmul over r instead (q (.., r, S, d) @
# k (.., 1, T, d)^T) would copy the keys r times, which on CPU costs more than the product.


def _scores(q, keys):
    """q (B, G, r, S, w) @ keys (B, G, T, w)^T -> (B, G, r, S, T)."""
    b, g, r, s, w = q.shape
    return (q.reshape(b, g, r * s, w) @ keys.transpose(-1, -2)).view(b, g, r, s, -1)


def _weighted_values(probs, v):
    """probs (B, G, r, S, T) @ v (B, G, T, Dv) -> (B, G, r, S, Dv)."""
    b, g, r, s, t = probs.shape
    return (probs.reshape(b, g, r * s, t) @ v).view(b, g, r, s, -1)
