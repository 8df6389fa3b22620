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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_softmax_attention(scores, v, mask, is_causal):
    """softmax(scores + mask) @ v, scores (B, Hq, S, T) already scaled, v (B, Hkv, T, D)."""
    scores = scores + _sequence_bias(mask, is_causal, scores.shape, scores.device)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    repeats = scores.shape[1] // v.shape[1]
    return probs @ v.repeat_interleave(repeats, dim=1)


@torch.library.custom_op("kvcompile::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool
) -> torch.Tensor:
    """Dense GQA-native attention; K/V are not repeated. Matches SDPA with `scale`."""
    repeats = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(repeats, dim=1),
        v.repeat_interleave(repeats, dim=1),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
    )


@attention.register_fake
def _(q, k, v, mask, scale, is_causal):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("kvcompile::attention_with_cache", mutates_args=())
def attention_with_cache(
    q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the S new tokens' K/V to the cache's P and attend causally, the new tokens last
    (query i sees keys 0..P+i); returns (output, present K, present V). The contract of
    onnxruntime's GroupQueryAttention, which the ONNX export can emit for it."""
    k, v = torch.cat([past_k, new_k], dim=2), torch.cat([past_v, new_v], dim=2)
    past, seq = past_k.shape[2], q.shape[2]
    allowed = torch.arange(past + seq, device=q.device) <= torch.arange(past, past + seq, device=q.device)[:, None]
    return attention(q, k, v, allowed, scale, False), k, v


@attention_with_cache.register_fake
def _(q, past_k, past_v, new_k, new_v, scale):
    k = torch.cat([past_k, new_k], dim=2)
    v = torch.cat([past_v, new_v], dim=2)
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), k, v


@torch.library.custom_op("kvcompile::gather_kv_channels", mutates_args=())
def gather_kv_channels(x: torch.Tensor, heads: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) -> (B, G, T, w): KV heads `heads` (G,), channels `channels[g]` of head g."""
    picked = x.index_select(1, heads)
    b, g, t, _ = picked.shape
    return picked.gather(-1, channels[None, :, None, :].expand(b, g, t, channels.shape[-1])).contiguous()


@gather_kv_channels.register_fake
def _(x, heads, channels):
    return x.new_empty(x.shape[0], heads.shape[0], x.shape[2], channels.shape[-1])


@torch.library.custom_op("kvcompile::pruned_attention", mutates_args=())
def pruned_attention(
    q: torch.Tensor,
    k_groups: list[torch.Tensor],
    heads: list[torch.Tensor],
    channels: list[torch.Tensor],
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """Attention whose scores use only the kept key channels.

    Every query head of a KV head's GQA group is gathered with that KV head's channels, so
    `q[idx] . k[idx]` is the score; `scale` stays the full head's. A KV head in no group keeps no
    channels: its scores are 0 and it attends uniformly over the unmasked keys.
    """
    return pruned_attention_reference(q, k_groups, heads, channels, v, mask, scale, is_causal)


def pruned_attention_reference(q, k_groups, heads, channels, v, mask, scale, is_causal):
    b, hq, s, d = q.shape
    hkv, t = v.shape[1], v.shape[2]
    r = hq // hkv
    scores = q.new_zeros(b, hkv, r, s, t, dtype=torch.float32)
    q_by_kv_head = q.view(b, hkv, r, s, d)
    for keys, group_heads, group_channels in zip(k_groups, heads, channels):
        g, w = group_channels.shape
        q_group = q_by_kv_head.index_select(1, group_heads)
        q_group = q_group.gather(-1, group_channels[None, :, None, None, :].expand(b, g, r, s, w))
        group_scores = q_group.float() @ keys.float().unsqueeze(2).transpose(-1, -2)
        scores.index_copy_(1, group_heads, group_scores)
    scores = (scores * scale).view(b, hq, s, t)
    return masked_softmax_attention(scores, v, mask, is_causal)


@pruned_attention.register_fake
def _(q, k_groups, heads, channels, v, mask, scale, is_causal):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("kvcompile::windowed_attention", mutates_args=())
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
) -> torch.Tensor:
    """One softmax over LeanK's regions: window keys score with every channel, middle keys of
    group g with `channels[g]` only (original `scale`); KV heads in no group (streaming heads)
    see the window only.

    Computed the way a split-KV kernel does: a partial result (row max, sum of exponentials,
    unnormalised output) per region (the window, then each middle width group), combined by
    log-sum-exp. `mask` (bool or additive) and `is_causal` (top-left, like SDPA) refer to sequence
    order; window column j < `sink` is token j, the rest follow the middle.
    """
    return windowed_attention_reference(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale,
                                        is_causal, sink)


def windowed_attention_reference(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale, is_causal,
                                 sink):
    b, hq, s, d = q.shape
    hkv, window = k_window.shape[1], k_window.shape[2]
    middle = v_middle.shape[2]
    r = hq // hkv
    bias = _sequence_bias(mask, is_causal, (b, hq, s, window + middle), q.device).reshape(b, hkv, r, s, window + middle)
    # the sequence is [window[:sink], middle, window[sink:]]
    window_bias = torch.cat([bias[..., :sink], bias[..., sink + middle :]], dim=-1)
    middle_bias = bias[..., sink : sink + middle]

    q_by_kv_head = q.view(b, hkv, r, s, d).float()
    window_scores = q_by_kv_head @ k_window.float().unsqueeze(2).transpose(-1, -2) * scale + window_bias
    partials = [_partial_attention(window_scores, v_window)]
    middle_heads = torch.cat(heads).sort().values if heads else None  # the heads v_middle holds
    for keys, group_heads, group_channels in zip(k_middle, heads, channels):
        g, w = group_channels.shape
        q_group = q_by_kv_head.index_select(1, group_heads)
        q_group = q_group.gather(-1, group_channels[None, :, None, None, :].expand(b, g, r, s, w))
        scores = q_group @ keys.float().unsqueeze(2).transpose(-1, -2) * scale + middle_bias.index_select(1, group_heads)
        values = v_middle.index_select(1, torch.searchsorted(middle_heads, group_heads))
        partials.append(_on_all_heads(_partial_attention(scores, values), group_heads, hkv))
    return _combine_partials(partials).view(b, hq, s, -1).to(v_window.dtype)


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
    return probs @ v.float().unsqueeze(2), row_max, probs.sum(-1, keepdim=True)


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
def _(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale, is_causal, sink):
    return q.new_empty(q.shape[:-1] + v_window.shape[-1:])


@torch.library.custom_op("kvcompile::merge_heads", mutates_args=())
def merge_heads(x: torch.Tensor, groups: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, d) -> (B, G, S, s·d): the heads `groups[g]` (t of them) concatenated per token
    and mapped by `down[g]` (t·d, s·d), as in bases.py's c = k_group @ down."""
    b, _, seq, d = x.shape
    num_groups, t = groups.shape
    grouped = x.index_select(1, groups.flatten()).view(b, num_groups, t, seq, d)
    return grouped.permute(0, 1, 3, 2, 4).reshape(b, num_groups, seq, t * d) @ down


@merge_heads.register_fake
def _(x, groups, down):
    return x.new_empty(x.shape[0], groups.shape[0], x.shape[2], down.shape[-1])


@torch.library.custom_op("kvcompile::project_heads", mutates_args=())
def project_heads(x: torch.Tensor, heads: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, d) -> (B, H', S, d'): output head i is input head `heads[i]` times `weight[i]` (d, d')."""
    return x.index_select(1, heads) @ weight


@project_heads.register_fake
def _(x, heads, weight):
    return x.new_empty(x.shape[0], heads.shape[0], x.shape[2], weight.shape[-1])
