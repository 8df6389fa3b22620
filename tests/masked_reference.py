"""Independent reference for K-channel pruning: the semantics, written as plainly as possible.

A plan maps layer -> per KV head, the sorted ids of the post-RoPE key channels that are kept. The
prefill (first forward, empty cache) attends densely. Every later forward scores with the kept
channels only, i.e. the post-RoPE query of each query head in the KV head's GQA group has its other
channels zeroed before q.k; keys, values, softmax scale and mask are untouched. Unplanned layers are
untouched; a head keeping no channel gets all-zero scores (uniform over the unmasked keys).

With LeanK's windows (`Windows`), only the middle keys score with the kept channels: a forward
whose past holds P tokens treats keys [sink, sink + M) as middle, M = max(0, (P - sink - recent)
// buffer * buffer); every other key (the sink, the recent past, this forward's own tokens) scores
with all channels, and a head keeping no channel does not see the middle keys at all. Scores are
computed per key column: one plain softmax over all of them.

This runs the unmodified HF model with a custom attention function (registered through
`AttentionInterface`), so it shares no code with kvcompile's rewrite of the model.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.masking_utils import sdpa_mask

from kvcompile.capture import CACHE_NAME  # transformers' name for the cache argument, by version

ATTN_NAME = "kvcompile_masked_reference"

KChannels = Mapping[int, Sequence[Sequence[int]]]


class Windows(NamedTuple):
    sink: int
    recent: int
    buffer: int

    def middle_columns(self, past_len: int) -> tuple[int, int]:
        """[start, stop) of the middle keys for a forward whose past holds `past_len` tokens."""
        middle = max(0, (past_len - self.sink - self.recent) // self.buffer * self.buffer)
        return self.sink, self.sink + middle


_PLAN: contextvars.ContextVar[KChannels | None] = contextvars.ContextVar("kvcompile_masked_plan", default=None)
_WINDOWS: contextvars.ContextVar[Windows | None] = contextvars.ContextVar("kvcompile_masked_windows", default=None)


def _materialized_sdpa_mask(*args, **kwargs):
    # sdpa's mask builder, but never skipped: HF returns None for plain causal / single-token masks
    # (leaving causality to sdpa's `is_causal`), and we want the mask exactly as HF means it.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, Hq, S, D) post-RoPE; key/value (B, Hkv, T, D), not repeated for GQA."""
    _, num_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads

    plan, windows = _PLAN.get(), _WINDOWS.get()
    kept = plan.get(module.layer_idx) if plan is not None else None

    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scale = head_dim**-0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if kept is not None and kv_len > q_len:  # a past exists: decode
        keep = _query_channel_mask(kept, num_kv_heads, head_dim, group, query.device)
        pruned = torch.matmul(query.masked_fill(~keep, 0).float(), key.float().transpose(-1, -2)) * scale
        if windows is None:
            scores = pruned
        else:
            start, stop = windows.middle_columns(kv_len - q_len)
            middle = torch.zeros(kv_len, dtype=torch.bool, device=query.device)
            middle[start:stop] = True
            streaming = ~keep.any(-1, keepdim=True)  # (Hq, 1, 1)
            scores = torch.where(middle, pruned, scores).masked_fill(middle & streaming, torch.finfo(scores.dtype).min)

    if attention_mask is None:
        # Only reached if a caller bypasses our mask builder. Follows sdpa_attention_forward: one query
        # sees every key; several queries are causal, top-left aligned.
        if q_len > 1:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask.float()

    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value.float()).to(value.dtype)
    return out.transpose(1, 2).contiguous(), None


def _query_channel_mask(kept, num_kv_heads, head_dim, group, device) -> torch.Tensor:
    """(Hq, 1, D) bool, True on kept channels; query head i belongs to KV head i // group."""
    if len(kept) != num_kv_heads:
        raise ValueError(f"plan lists {len(kept)} KV heads, the layer has {num_kv_heads}")
    mask = torch.zeros(num_kv_heads, head_dim, dtype=torch.bool)
    for head, ids in enumerate(kept):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() and not (0 <= ids.min() and ids.max() < head_dim):
            raise ValueError(f"KV head {head}: channel ids {ids.tolist()} out of range [0, {head_dim})")
        mask[head, ids] = True
    return mask.repeat_interleave(group, dim=0)[:, None, :].to(device)


AttentionInterface.register(ATTN_NAME, _masked_attention)
AttentionMaskInterface.register(ATTN_NAME, _materialized_sdpa_mask)


@contextlib.contextmanager
def masked_attention(model, k_channels: KChannels, windows: Windows | None = None) -> Iterator[None]:
    """Within the block, `model` runs the reference attention for `k_channels` (and `windows`);
    restored on exit."""
    original = model.config._attn_implementation
    plan_token, windows_token = _PLAN.set(k_channels), _WINDOWS.set(windows)
    try:
        model.set_attn_implementation(ATTN_NAME)
        yield
    finally:
        model.set_attn_implementation(original)
        _PLAN.reset(plan_token)
        _WINDOWS.reset(windows_token)


@torch.no_grad()
def decode(
    model, input_ids: torch.Tensor, next_tokens: torch.Tensor | None = None, steps: int = 20
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prefill `input_ids` (B, S) into a DynamicCache, then `steps` one-token steps with the model as is.

    The token fed at step i is `next_tokens[:, i]` if given, else the argmax of the previous logits.
    Returns the last-position logits (B, V) of the prefill and of each step (steps + 1 tensors), and
    the fed tokens (B, steps).
    """
    if next_tokens is not None and (next_tokens.shape[0] != input_ids.shape[0] or next_tokens.shape[1] < steps):
        raise ValueError(f"next_tokens {tuple(next_tokens.shape)}: need ({input_ids.shape[0]}, >= {steps})")
    cache = DynamicCache()
    logits = [model(input_ids=input_ids, use_cache=True, **{CACHE_NAME: cache}).logits[:, -1]]
    fed = []
    for step in range(steps):
        token = next_tokens[:, step] if next_tokens is not None else logits[-1].argmax(-1)
        token = token.to(input_ids)
        fed.append(token)
        logits.append(model(input_ids=token[:, None], use_cache=True, **{CACHE_NAME: cache}).logits[:, -1])
    return logits, torch.stack(fed, dim=1) if fed else input_ids.new_empty(input_ids.shape[0], 0)


def masked_reference_decode(
    model,
    input_ids: torch.Tensor,
    k_channels: KChannels,
    next_tokens: torch.Tensor | None = None,
    steps: int = 20,
    windows: Windows | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`decode` with K-channel pruning per `k_channels` ({layer: [[kept ids of KV head 0], ...]}),
    within LeanK's `windows` if given."""
    with masked_attention(model, k_channels, windows):
        return decode(model, input_ids, next_tokens, steps)
