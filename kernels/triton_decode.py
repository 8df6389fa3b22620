"""Decode attention over a LeanK-compressed KV cache, in Triton.

The CUDA face of `kvcompile::windowed_attention` and `kvcompile::pruned_attention` (reference
implementations and layouts in `ops.py`) for the decode step: one new query token per sequence,
no mask, and optionally per-row token counts of caches written in place (`lengths`, read on the
device). Everything else falls back to the reference (`supported` says which).

Why a kernel at all
-------------------
Decoding one token is memory-bound: every step reads the whole cache once and does only ~2 FLOPs
per byte. The reference spends its time elsewhere: it gathers the query channels per width group,
repeats nothing but still materialises fp32 copies of every key and value (`keys.float()`), and
makes one pass per region plus a combine in eager PyTorch. What matters for speed is that each
byte of the compressed cache is read exactly once, in its stored dtype, and that enough programs
run to fill the GPU even at batch 1.

The algorithm
-------------
1. **Regions.** The sequence is split the way the cache stores it: the full-channel window (every
   KV head, every channel), and the middle, one region per width group (the group's KV heads,
   `w` kept channels; K stored `(B, G, M, w)`). A streaming head (in no group) has no middle: its
   softmax runs over the window alone. `pruned_attention` is the same machinery with no window:
   one region per width group over all T tokens, plus a width-0 region for the heads that keep no
   channel (their scores are all 0, so they attend uniformly, exactly as the reference does).
   Since the mask is None, the order of tokens in the sequence (`sink`) does not change the
   result: softmax is invariant to permuting keys together with their values.

2. **GQA-native.** One program owns one KV head of one sequence and *all* `r` query heads that
   share it. It loads a key block once and multiplies it by the `(r, w)` query block (the query
   channels gathered with that head's `channels` row) with `tl.dot`, instead of loading the same
   keys `r` times. `tl.dot` wants every dimension to be a power of two and at least 16, so the
   query rows (r may be 3), channels and value dims are padded and masked; the padding rows cost
   a few idle tensor-core lanes, not memory traffic.

3. **Split-K (flash-decoding).** With one query token there is no query-length parallelism, and
   `B * Hkv` programs (3 at batch 1 for SmolLM2) would leave most SMs idle. So each region's
   tokens are cut into chunks and every (sequence, KV head, chunk) is a program. A program keeps
   the usual online-softmax state over its chunk (running max `m`, sum of exponentials `l`, and
   unnormalised output `acc`) and writes it to a *slot*. Regions sit side by side in slot space
   (window slots, then middle slots), so a second small kernel combines each query head's slots
   by log-sum-exp, the same combination `ops._combine_partials` does across regions:

       m = max_i m_i,   out = sum_i 2^(m_i - m) acc_i / sum_i 2^(m_i - m) l_i

   A head reads only the slots its regions wrote (a per-KV-head slot count), so streaming heads
   need no "empty" partials and nothing has to be zero-filled first. An empty region (no middle
   yet) simply launches nothing.

4. **Per-row lengths.** A cache written in place has a capacity C and a token count per row
   (`lengths`, `window_lengths`, `middle_lengths`: (B,) int64 or int32 on the device). The grid is
   sized from C, which the host knows without a sync; each program loads its row's count and cuts
   its chunk there, so the chunks of a row past its count run no token and store the empty
   partial (m = -inf, l = 0, acc = 0), which the combine weighs by 2^(-inf - m) = 0. Slot 0 (the
   first chunk of a head's first region) always holds a token, since every row holds at least
   one: the running max is finite from the first slot on, so no `-inf - -inf` NaN can arise.
   Without lengths every row holds C tokens and every launched chunk at least one.

5. **Precision.** Scores and the softmax state are fp32 whatever the input dtype. Scores are
   scaled by `scale * log2(e)` so the exponentials are `exp2` (one instruction on NVIDIA GPUs);
   maxima are therefore kept in base-2 units throughout, in both kernels. fp16/bf16 inputs go
   through the tensor cores (probabilities rounded to the value dtype for `p @ v`, as
   FlashAttention does); fp32 inputs use `input_precision="ieee"`, since TF32 would give ~1e-3
   errors. The Triton interpreter multiplies bf16 operands as their raw bit patterns (it stores
   bf16 as uint16), so under `TRITON_INTERPRET=1` bf16 blocks are upcast to fp32 before `tl.dot`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

# Decided when this module is imported, like `@triton.jit` itself decides whether it interprets.
_INTERPRET = bool(triton.knobs.runtime.interpret)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every block dimension to be at least 16


def supported(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """True when the Triton path computes this call: one query token, no mask, a float dtype, and
    q on CUDA (or the Triton interpreter on)."""
    return (
        mask is None
        and q.dim() == 4
        and q.shape[2] == 1
        and q.dtype in _DTYPES
        and (q.is_cuda or _INTERPRET)
    )


# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _dot(a, b, EXACT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; EXACT_FP32 multiplies in true fp32 (no TF32)."""
    if EXACT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _region_partials_kernel(
    q_ptr, k_ptr, v_ptr, heads_ptr, channels_ptr, value_rows_ptr, skip_ptr, lengths_ptr,
    max_ptr, sum_ptr, acc_ptr,
    tokens, tokens_per_split, slot_offset, num_rows, group_size, width, value_dim, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_cg, stride_cd,
    stride_lb,
    stride_pb, stride_ph, stride_ps,
    stride_ab, stride_ah, stride_as, stride_ad,
    HAS_HEADS: tl.constexpr, GATHER_Q: tl.constexpr, HAS_VALUE_ROWS: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, EXACT_FP32: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (sequence, key row, chunk) of a region: online softmax over the chunk's tokens for the
    group_size query heads of the row's KV head, written to slot `slot_offset + chunk`. The region
    holds `tokens` tokens in every sequence, or lengths[sequence] with HAS_LENGTHS."""
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    batch = (pid_row // num_rows).to(tl.int64)  # int64: B * stride_b may pass 2**31 elements
    row = pid_row % num_rows  # key row in this region's K tensor

    kv_head = tl.load(heads_ptr + row) if HAS_HEADS else row
    value_row = tl.load(value_rows_ptr + row) if HAS_VALUE_ROWS else kv_head
    if HAS_LENGTHS:  # int32, like the chunk bounds it cuts (a count is at most C < 2**31)
        tokens = tl.load(lengths_ptr + batch * stride_lb).to(tl.int32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, tokens)
    stored_heads = group_size
    if HAS_SKIP:  # this head's slots belong to another region: run no token, store nothing
        owned = tl.load(skip_ptr + row) == 0
        end = tl.where(owned, end, start)
        stored_heads = tl.where(owned, group_size, 0)

    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_W)
    d = tl.arange(0, BLOCK_DV)
    q_heads = kv_head * group_size + h
    head_ok = h < group_size
    channel_ok = c < width

    # the query block (r, w): this KV head's kept channels of each query head sharing it
    q_channels = c
    if GATHER_Q:
        q_channels = tl.load(channels_ptr + row * stride_cg + c * stride_cd, mask=channel_ok, other=0)
    q_block = tl.load(
        q_ptr + batch * stride_qb + q_heads[:, None] * stride_qh + q_channels[None, :] * stride_qd,
        mask=head_ok[:, None] & channel_ok[None, :],
        other=0.0,
    )

    k_base = k_ptr + batch * stride_kb + row * stride_kh
    v_base = v_ptr + batch * stride_vb + value_row * stride_vh
    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for block_start in range(start, end, BLOCK_N):
        t = block_start + tl.arange(0, BLOCK_N)
        in_chunk = t < end
        # keys loaded transposed (w, n) so the score block is a plain q @ k
        k_block = tl.load(
            k_base + c[:, None] * stride_kd + t[None, :] * stride_kt,
            mask=channel_ok[:, None] & in_chunk[None, :],
            other=0.0,
        )
        scores = _dot(q_block, k_block, EXACT_FP32) * qk_scale  # base-2 units
        scores = tl.where(in_chunk[None, :], scores, float("-inf"))

        # every block holds >= 1 token of the chunk, so new_max is finite
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)

        v_block = tl.load(
            v_base + t[:, None] * stride_vt + d[None, :] * stride_vd,
            mask=in_chunk[:, None] & (d < value_dim)[None, :],
            other=0.0,
        )
        if not EXACT_FP32:
            probs = probs.to(v_block.dtype)  # tensor-core operands share a dtype
        acc = acc * rescale[:, None] + _dot(probs, v_block, EXACT_FP32)
        row_max = new_max

    slot = slot_offset + split
    store_rows = h < stored_heads  # (not head_ok & owned: the interpreter mishandles a scalar mask)
    partial = batch * stride_pb + q_heads * stride_ph + slot * stride_ps
    tl.store(max_ptr + partial, row_max, mask=store_rows)
    tl.store(sum_ptr + partial, row_sum, mask=store_rows)
    acc_at = acc_ptr + batch * stride_ab + q_heads[:, None] * stride_ah + slot * stride_as + d[None, :] * stride_ad
    tl.store(acc_at, acc, mask=store_rows[:, None] & (d < value_dim)[None, :])


@triton.jit
def _combine_kernel(
    max_ptr, sum_ptr, acc_ptr, slots_ptr, out_ptr,
    num_q_heads, group_size, value_dim,
    stride_pb, stride_ph, stride_ps,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_ob, stride_oh, stride_od,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): log-sum-exp over the slots its KV head's regions wrote."""
    pid = tl.program_id(0)
    batch = (pid // num_q_heads).to(tl.int64)
    q_head = pid % num_q_heads
    num_slots = tl.load(slots_ptr + q_head // group_size)
    d = tl.arange(0, BLOCK_DV)
    d_ok = d < value_dim

    partial = max_ptr + batch * stride_pb + q_head * stride_ph
    partial_sum = sum_ptr + batch * stride_pb + q_head * stride_ph
    partial_acc = acc_ptr + batch * stride_ab + q_head * stride_ah + d * stride_ad
    run_max = tl.full([1], float("-inf"), tl.float32)
    run_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for slot in range(0, num_slots):
        slot_max = tl.load(partial + slot * stride_ps + tl.zeros([1], tl.int32))
        slot_sum = tl.load(partial_sum + slot * stride_ps + tl.zeros([1], tl.int32))
        slot_acc = tl.load(partial_acc + slot * stride_as, mask=d_ok, other=0.0)
        new_max = tl.maximum(run_max, slot_max)  # finite: every written slot saw a token
        old_weight = tl.exp2(run_max - new_max)  # 0 on the first slot (run_max = -inf)
        slot_weight = tl.exp2(slot_max - new_max)
        run_sum = run_sum * old_weight + slot_sum * slot_weight
        acc = acc * old_weight + slot_acc * slot_weight
        run_max = new_max
    out = acc / run_sum
    out_at = out_ptr + batch * stride_ob + q_head * stride_oh + d * stride_od
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------------------
# host side


def windowed_decode(
    q: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    k_middle: list[torch.Tensor],
    heads: list[torch.Tensor],
    channels: list[torch.Tensor],
    v_middle: torch.Tensor,
    scale: float,
    sink: int,
    *,
    window_lengths: torch.Tensor | None = None,
    middle_lengths: torch.Tensor | None = None,
    block_tokens: int = 64,
    split_tokens: int | None = None,
) -> torch.Tensor:
    """`windowed_attention(q, ..., mask=None, is_causal=False, sink, window_lengths, middle_lengths)`
    for one query token.

    q (B, Hq, 1, D); window (B, Hkv, Tw, D/Dv); k_middle[g] (B, G_g, M, w_g) of KV heads heads[g]
    keeping channels[g]; v_middle (B, Hm, M, Dv) of the non-streaming heads, ascending. Returns
    (B, Hq, 1, Dv) in v_window's dtype. `sink` does not change the result without a mask.
    `window_lengths` and `middle_lengths` ((B,) each, both or neither): row b reads only window
    slots [0, window_lengths[b]) (at least 1) and middle slots [0, middle_lengths[b]); Tw and M are
    then capacities. `block_tokens` (tokens per inner step) and `split_tokens` (tokens per program;
    default: enough programs to fill the device) are tuning knobs, exposed for tests.
    """
    _check_decode(q, [k_window, v_window, v_middle, *k_middle], window_lengths, middle_lengths)
    batch, num_kv_heads = k_window.shape[:2]
    block = _block(block_tokens)
    heads = [h.to(q.device) for h in heads]
    # every launch sized to fill the device by itself: launches on one stream run one after another
    window_splits, window_chunk = _splits(k_window.shape[2], batch * num_kv_heads, block, split_tokens, q.device)
    middle_splits = [_splits(v_middle.shape[2], batch * h.shape[0], block, split_tokens, q.device) for h in heads]
    num_slots = window_splits + max((n for n, _ in middle_splits), default=0)
    partials = _Partials(q, num_kv_heads, v_window.shape[-1], num_slots)

    _launch_region(
        q, partials, scale, block, window_chunk, window_splits, keys=k_window, values=v_window, lengths=window_lengths,
    )  # fmt: skip
    # streaming heads read only the window's slots, the others theirs and their group's after it
    slots = torch.full((num_kv_heads,), window_splits, dtype=torch.int32, device=q.device)
    if heads:
        middle_heads = torch.cat(heads).sort().values  # the KV heads v_middle holds, in its order
    for keys, group_heads, group_channels, (splits, chunk) in zip(k_middle, heads, channels, middle_splits):
        _launch_region(
            q, partials, scale, block, chunk, splits,
            keys=keys, values=v_middle, heads=group_heads, channels=group_channels.to(q.device),
            value_rows=torch.searchsorted(middle_heads, group_heads), slot_offset=window_splits,
            lengths=middle_lengths,
        )  # fmt: skip
        slots.index_fill_(0, group_heads, window_splits + splits)
    return _combine(partials, slots, v_window.dtype)


def pruned_decode(
    q: torch.Tensor,
    k_groups: list[torch.Tensor],
    heads: list[torch.Tensor],
    channels: list[torch.Tensor],
    v: torch.Tensor,
    scale: float,
    *,
    lengths: torch.Tensor | None = None,
    block_tokens: int = 64,
    split_tokens: int | None = None,
) -> torch.Tensor:
    """`pruned_attention(q, ..., mask=None, is_causal=False, lengths)` for one query token.

    q (B, Hq, 1, D); k_groups[g] (B, G_g, T, w_g) of KV heads heads[g] keeping channels[g];
    v (B, Hkv, T, Dv). KV heads in no group attend uniformly. Returns (B, Hq, 1, Dv) in v's dtype.
    `lengths` (B,): row b reads only slots [0, lengths[b]) (at least 1); T is then a capacity.
    Tuning knobs as in `windowed_decode`.
    """
    _check_decode(q, [v, *k_groups], lengths)
    batch, num_kv_heads, length = v.shape[:3]
    block = _block(block_tokens)
    heads = [h.to(q.device) for h in heads]
    group_splits = [_splits(length, batch * h.shape[0], block, split_tokens, q.device) for h in heads]
    # Heads keeping no channel, counted from shapes alone (no device sync), form a width-0 region
    # launched over every head; its programs for the grouped heads store nothing.
    uniform_heads = num_kv_heads - sum(h.shape[0] for h in heads)
    uniform_splits, uniform_chunk = _splits(length, batch * uniform_heads, block, split_tokens, q.device)
    num_slots = max([uniform_splits] + [n for n, _ in group_splits])
    partials = _Partials(q, num_kv_heads, v.shape[-1], num_slots)

    slots = torch.full((num_kv_heads,), uniform_splits, dtype=torch.int32, device=q.device)
    for keys, group_heads, group_channels, (splits, chunk) in zip(k_groups, heads, channels, group_splits):
        _launch_region(
            q, partials, scale, block, chunk, splits,
            keys=keys, values=v, heads=group_heads, channels=group_channels.to(q.device), lengths=lengths,
        )  # fmt: skip
        slots.index_fill_(0, group_heads, splits)
    if uniform_heads:
        grouped = torch.zeros(num_kv_heads, dtype=torch.int8, device=q.device)
        for group_heads in heads:
            grouped.index_fill_(0, group_heads, 1)
        _launch_region(
            q, partials, scale, block, uniform_chunk, uniform_splits, keys=None, values=v, skip=grouped, lengths=lengths,
        )  # fmt: skip
    return _combine(partials, slots, v.dtype)


def _check_decode(q, tensors, *lengths):
    """Shapes and dtypes only: the lengths' values stay on the device, unread by the host."""
    if not (q.dim() == 4 and q.shape[2] == 1):
        raise ValueError(f"the Triton decode kernels take one query token, q {tuple(q.shape)}")
    if q.dtype not in _DTYPES or any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"q, K and V must share one of {_DTYPES}; q is {q.dtype}, K/V {[t.dtype for t in tensors]}")
    given = [x for x in lengths if x is not None]
    if given and len(given) != len(lengths):
        raise ValueError("pass every lengths argument or none")
    for x in given:
        if x.shape != (q.shape[0],) or x.dtype not in (torch.int64, torch.int32) or x.device != q.device:
            raise ValueError(f"lengths must be ({q.shape[0]},) int64 or int32 on {q.device}, got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")


def _splits(tokens, programs_per_split, block, split_tokens, device) -> tuple[int, int]:
    """(number of chunks, tokens per chunk) of a region of `tokens` tokens (0 chunks when empty).
    By default enough chunks that the region's programs cover the device's SMs about twice; a
    chunk is a whole number of blocks so only a region's last block is partial."""
    if tokens == 0 or programs_per_split == 0:
        return 0, block
    if split_tokens is None:
        wanted = max(1, math.ceil(2 * _num_sms(device) / programs_per_split))
        split_tokens = math.ceil(tokens / wanted)
    chunk = max(1, math.ceil(split_tokens / block)) * block
    return math.ceil(tokens / chunk), chunk


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


class _Partials:
    """Per (sequence, query head, slot): row max (base 2), sum of exponentials, unnormalised
    output, fp32; and the GQA group size r (query head i belongs to KV head i // r)."""

    def __init__(self, q, num_kv_heads, value_dim, num_slots):
        batch, num_q_heads = q.shape[:2]
        self.group_size = num_q_heads // num_kv_heads
        # empty, not zeroed: a head's combine reads only the slots its regions wrote
        self.row_max = torch.empty(batch, num_q_heads, num_slots, dtype=torch.float32, device=q.device)
        self.row_sum = torch.empty_like(self.row_max)
        self.acc = torch.empty(batch, num_q_heads, num_slots, value_dim, dtype=torch.float32, device=q.device)


def _launch_region(
    q, partials, scale, block, chunk, num_splits, *, keys, values, heads=None, channels=None,
    value_rows=None, skip=None, lengths=None, slot_offset=0,
):  # fmt: skip
    """Partials of one region, into slots slot_offset + [0, num_splits).

    keys (B, G, T, w), or None for a width-0 region (scores all 0). Row g of keys is KV head
    heads[g] (row g itself when heads is None) keeping channels[g] (every channel when None); its
    values are values[:, value_rows[g]] (the KV head's own row when None); rows with skip[g] != 0
    store nothing. Sequence b holds T tokens, or lengths[b] (B,) when given.
    """
    if num_splits == 0:
        return
    batch = q.shape[0]
    num_rows = heads.shape[0] if heads is not None else values.shape[1]
    width = keys.shape[-1] if keys is not None else 0
    value_dim = values.shape[-1]
    unused = values  # any valid pointer, for arguments a constexpr flag leaves unread
    _region_partials_kernel[(batch * num_rows, num_splits)](
        q, _or(keys, unused), values, _or(heads, unused), _or(channels, unused),
        _or(value_rows, unused), _or(skip, unused), _or(lengths, unused),
        partials.row_max, partials.row_sum, partials.acc,
        values.shape[2], chunk, slot_offset, num_rows, partials.group_size, width, value_dim,
        scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(3),
        *(keys.stride() if keys is not None else (0, 0, 0, 0)),
        *values.stride(),
        *(channels.stride() if channels is not None else (0, 0)),
        lengths.stride(0) if lengths is not None else 0,
        *partials.row_max.stride(),
        *partials.acc.stride(),
        HAS_HEADS=heads is not None,
        GATHER_Q=channels is not None,
        HAS_VALUE_ROWS=value_rows is not None,
        HAS_SKIP=skip is not None,
        HAS_LENGTHS=lengths is not None,
        EXACT_FP32=_exact_fp32(q.dtype),
        BLOCK_H=_block(partials.group_size),
        BLOCK_W=_block(width),
        BLOCK_DV=_block(value_dim),
        BLOCK_N=block,
    )  # fmt: skip


def _combine(partials, slots, dtype):
    """(B, Hq, 1, Dv) in `dtype`: each query head's slots (slots[kv head] of them) combined."""
    batch, num_q_heads, _, value_dim = partials.acc.shape
    out = torch.empty(batch, num_q_heads, 1, value_dim, dtype=dtype, device=partials.acc.device)
    _combine_kernel[(batch * num_q_heads,)](
        partials.row_max, partials.row_sum, partials.acc, slots, out,
        num_q_heads, partials.group_size, value_dim,
        *partials.row_max.stride(),
        *partials.acc.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        BLOCK_DV=_block(value_dim),
    )  # fmt: skip
    return out


def _or(tensor, default):
    return tensor if tensor is not None else default


def _block(size: int) -> int:
    """A power of two >= size and >= tl.dot's minimum (16)."""
    return max(_MIN_DOT, triton.next_power_of_2(max(size, 1)))


def _exact_fp32(dtype) -> bool:
    # fp32 multiplies exactly (no TF32); bf16 too under the interpreter, whose tl.dot would
    # multiply bf16's uint16 storage as integers
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)
