"""The kvcompile:: operators.

Each op is a `torch.library.custom_op` with a plain-PyTorch reference implementation (the truth
that faster implementations are tested against) and a fake implementation for tracing. Layouts:

    q            (B, Hq, S, D)   post-RoPE queries, Hq = r * Hkv (GQA: query head i uses KV head i // r)
    k, v         (B, Hkv, T, D)  the whole key/value sequence, past and new, T >= S
    mask         boolean (True = attend) or additive float, broadcastable to (B, Hq, S, T), or None
    k_groups[g]  (B, G_g, T, w_g) the keys of KV heads `heads[g]` (G_g,), keeping channels
                 `channels[g]` (G_g, w_g) of each: the compressed K cache of one width group
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_softmax_attention(scores, v, mask, is_causal):
    """softmax(scores + mask) @ v, scores (B, Hq, S, T) already scaled, v (B, Hkv, T, D)."""
    if is_causal:
        # SDPA's convention: top-left aligned, query i sees keys 0..i
        s, t = scores.shape[-2:]
        causal = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
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
    return _masked_softmax_attention(scores, v, mask, is_causal)


@pruned_attention.register_fake
def _(q, k_groups, heads, channels, v, mask, scale, is_causal):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


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
