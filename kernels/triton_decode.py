"""Decode attention over a LeanK-compressed KV cache, in Triton: one launch per call.

The CUDA face of `kvcompile::windowed_attention`, `kvcompile::pruned_attention` and
`kvcompile::attention` (reference implementations and layouts in `ops.py`) for the decode step: one
new query token per sequence, no mask, and optionally per-row token counts of caches written in
place (`lengths`, read on the device). Everything else falls back to the reference (`supported`
says which).

Why a kernel at all
-------------------
Decoding one token is memory-bound: every step reads the whole cache once and does only ~2 FLOPs
per byte. What matters for speed is that each byte of the compressed cache is read exactly once,
in its stored dtype, that enough programs run to fill the GPU even at batch 1, and that a call
costs one launch: a decode step runs one attention per layer, and at batch 1 a launch, or a graph
node, costs as much as reading a few hundred kilobytes.

The algorithm
-------------
1. **Regions.** A KV head's tokens are split the way the cache stores them, into at most two
   regions: the full-channel *window* (every channel of every head; `attention` is a window over
   the whole sequence) and its *middle*, the head's width group (`w` kept channels, K stored
   `(B, G, M, w)`). A streaming head (in no group) has no middle: its softmax runs over the window
   alone. `pruned_attention` has no window: each head's one region is its group over all T
   tokens, or, for a head keeping no channel, a width-0 region whose scores are all 0 (it attends
   uniformly, exactly as the reference does). Without a mask the order of tokens (`sink`) does not
   change the result: softmax is invariant to permuting keys together with their values.

2. **GQA-native.** One program owns one KV head of one sequence and *all* `r` query heads that
   share it. It loads a key block once and multiplies it by the `(r, w)` query block (the query
   channels gathered with that head's `channels` row) with `tl.dot`, instead of loading the same
   keys `r` times. `tl.dot` wants every dimension to be a power of two and at least 16, so query
   rows (r may be 3), channels and value dims are padded and masked; the padding rows cost a few
   idle tensor-core lanes, not memory traffic.

3. **Split-K, sized on the device.** With one query token there is no query-length parallelism,
   and `B * Hkv` programs (3 at batch 1 for SmolLM2) would leave most SMs idle. So every
   (sequence, KV head) gets up to S programs, *splits*, S chosen on the host from shapes alone:
   one wave of programs (`PROGRAMS_PER_SM`), within bounds on the tokens a piece holds. Each
   program then reads its row's token counts and cuts its own piece of the work. A head uses a
   share of the S splits in proportion to the bytes it reads (the widest head all S; a head keeping
   16 channels about half, and its other programs return at once), shared again between its
   window and middle by bytes (a window of ~1K full-width tokens gets one split, a middle of 31K
   narrow ones the rest), and each region's tokens are cut evenly among its splits. So a cache
   with room for 64K tokens that holds 33K spreads those 33K over every program, and one CUDA
   graph captured at the capacity serves every length.
   In a launch of one wave, narrow regions step through longer token blocks than the window
   (`NARROW_BLOCK_GROWTH`), so a step of any region moves about the same bytes.

4. **The fused combine.** A program keeps the usual online-softmax state over its piece (running
   max `m`, sum of exponentials `l`, unnormalised output `acc`) and writes it to its slot. Then it
   increments its (sequence, KV head)'s counter; the program that brings it to S, the last of the
   head's splits to finish, reads the S slots back and combines them by log-sum-exp,

       m = max_i m_i,   out = sum_i 2^(m_i - m) acc_i / sum_i 2^(m_i - m) l_i

   the same combination `ops._combine_partials` does across regions. The counter increment is an
   acquire-release atomic after a barrier, so the last program sees every slot the others wrote.
   A split with no token (a short row, an empty middle) stores m = -inf, l = 0, which weighs 0;
   the combine never forms -inf - -inf. The counters are zeroed by each call (a memset node in a
   CUDA graph: 1.6 us of a 39 us call at 1 x 32K on an H100, against a persistent buffer that the
   last program re-zeroes): counters kept zeroed between calls would be one more buffer living
   across calls, which a CUDA graph tree's memory pool must not hold, and which two graphs replayed
   on two streams, or a call that died half-way, would leave wrong for every later call.

5. **Precision.** Scores and the softmax state are fp32 whatever the input dtype. Scores are
   scaled by `scale * log2(e)` so the exponentials are `exp2` (one instruction on NVIDIA GPUs);
   maxima are therefore kept in base-2 units throughout. fp16/bf16 inputs go through the tensor
   cores (probabilities rounded to the value dtype for `p @ v`, as FlashAttention does); fp32
   inputs use `input_precision="ieee"`, since TF32 would give ~1e-3 errors. The Triton interpreter
   multiplies bf16 operands as their raw bit patterns (it stores bf16 as uint16), so under
   `TRITON_INTERPRET=1` bf16 blocks are upcast to fp32 before `tl.dot`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Decided when this module is imported, like `@triton.jit` itself decides whether it interprets.
_INTERPRET = bool(triton.knobs.runtime.interpret)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every block dimension to be at least 16
_UNIFORM_BLOCK_W = tl.constexpr(_MIN_DOT)  # the (unread) query width of a head keeping no channel
# fp32 partial outputs the combine loads per round (registers, not memory). The combine is the serial
# tail of a call, and each round one dependent trip to L2: on an H100, graphed, 8 layers of the LeanK
# mask, per call, 4096 (8 of batch 1's 33 slots a round) -> 16384 (32): 1 x 32K 45.4 -> 39.0 us,
# 1 x 128K 121.5 -> 114.5 us; 32768 (one round of 64, spilling) lost (42.3 us). Launches of 8 splits
# or fewer (large batches) combine in one round either way.
_COMBINE_ELEMENTS = 16384
# The default split: one wave of programs, two per SM (measured on an H200 at batch 1 against 4, 8
# and 16), unless pieces would be shorter than MIN_PIECE tokens; more programs, in waves, when
# pieces would be longer than MAX_PIECE (at large batch, waves balance heads of uneven widths).
PROGRAMS_PER_SM = 2
MIN_PIECE, MAX_PIECE = 512, 4096
# In a launch of one wave, a narrow region (a width group keeping few K channels, a head attending
# uniformly) steps through longer token blocks, up to NARROW_BLOCK_GROWTH times the full-width
# block, so that each step moves about the bytes a full-width block does: a step's fixed work (the
# softmax update, the loop's barriers) is paid per block, not per byte. Measured on an H200 with
# the LeanK mask, graphed: 1 x 128K went from 1.23x to 1.30x SDPA, 1 x 32K unchanged. A launch of
# several waves keeps full-width blocks: the longer blocks' pipeline buffers leave room for fewer
# programs per SM, and 8 x 32K lost (1.51x to 1.40x); fewer pipeline stages or more warps lost everywhere.
NARROW_BLOCK_GROWTH = 2


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
# kernel


@triton.jit
def _dot(a, b, EXACT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; EXACT_FP32 multiplies in true fp32 (no TF32)."""
    if EXACT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _online_softmax(
    q_block, k_base, stride_kt, stride_kd, width, v_base, stride_vt, stride_vd, value_dim, start, end, qk_scale,
    ring_sink, ring_start, ring_period,
    HAS_KEYS: tl.constexpr, RING: tl.constexpr, EXACT_FP32: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """(max, sum, acc) of the query block (BLOCK_H, BLOCK_W) over tokens [start, end) of one key
    row of `width` channels; HAS_KEYS=False scores every token 0 (a head keeping no channel).
    RING: token t >= ring_sink sits in slot ring_sink + (t - ring_sink + ring_start) % ring_period, with
    0 <= ring_start < ring_period and t - ring_sink < ring_period, so the modulo is one subtraction."""
    c = tl.arange(0, BLOCK_W)
    d = tl.arange(0, BLOCK_DV)
    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for block_start in range(start, end, BLOCK_N):
        t = block_start + tl.arange(0, BLOCK_N)
        in_piece = t < end
        slot = t
        if RING:
            in_ring = t - ring_sink + ring_start
            in_ring = tl.where(in_ring >= ring_period, in_ring - ring_period, in_ring)
            slot = tl.where(t < ring_sink, t, ring_sink + in_ring)
        if HAS_KEYS:  # keys loaded transposed (w, n) so the score block is a plain q @ k
            k_block = tl.load(
                k_base + c[:, None] * stride_kd + slot[None, :] * stride_kt,
                mask=(c < width)[:, None] & in_piece[None, :],
                other=0.0,
            )
            scores = _dot(q_block, k_block, EXACT_FP32) * qk_scale  # base-2 units
        else:
            scores = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        scores = tl.where(in_piece[None, :], scores, float("-inf"))

        # every block holds >= 1 token of the piece, so new_max is finite
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)

        v_block = tl.load(
            v_base + slot[:, None] * stride_vt + d[None, :] * stride_vd,
            mask=in_piece[:, None] & (d < value_dim)[None, :],
            other=0.0,
        )
        if not EXACT_FP32:
            probs = probs.to(v_block.dtype)  # tensor-core operands share a dtype
        acc = acc * rescale[:, None] + _dot(probs, v_block, EXACT_FP32)
        row_max = new_max
    return row_max, row_sum, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_window_ptr, v_window_ptr, window_lengths_ptr, ring_start_ptr, sink,
    k_middle_ptrs, heads_ptrs, channels_ptrs, v_middle_ptr, middle_lengths_ptr,
    max_ptr, sum_ptr, acc_ptr, counters_ptr, out_ptr,
    num_kv_heads, num_splits, window_tokens, middle_tokens, group_size, head_dim, value_dim, widest_middle, qk_scale,
    group_rows, group_widths,
    stride_qb, stride_qh, stride_qd,
    stride_kwb, stride_kwh, stride_kwt, stride_kwd,
    stride_vwb, stride_vwh, stride_vwt, stride_vwd,
    k_middle_strides, channels_strides,
    stride_vmb, stride_vmh, stride_vmt, stride_vmd,
    stride_lw, stride_lm, stride_ls,
    stride_pb, stride_ph, stride_ps,
    stride_ab, stride_ah, stride_as, stride_ad,
    stride_ob, stride_oh, stride_od,
    HAS_WINDOW: tl.constexpr, NUM_GROUPS: tl.constexpr, UNIFORM_REST: tl.constexpr, VALUES_BY_HEAD: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, RING: tl.constexpr, MIDDLE_RING: tl.constexpr, EXACT_FP32: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_WS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NS: tl.constexpr, BLOCK_N_UNIFORM: tl.constexpr,
    PIECE_UNIT: tl.constexpr, COMBINE_H: tl.constexpr, COMBINE_SLOTS: tl.constexpr,
):  # fmt: skip
    """Split `split` of one (sequence, KV head): its piece of the head's regions into its slot, and,
    for the last split to finish, the head's output. `widest_middle` is the widest middle's K width
    (-1: no head has a middle). RING: the window's slots after the sink are a ring; MIDDLE_RING: the
    middle's slots are (a sliding layer's cache); either starts at the row's `ring_start`."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    batch = (pid // num_kv_heads).to(tl.int64)  # int64: B * stride_b may pass 2**31 elements
    kv_head = pid % num_kv_heads

    # The head's group (-1: none), its row in that group's K, and its row in the middle's values
    # (which hold the grouped heads ascending), found in the small `heads` tensors.
    group = kv_head * 0 - 1
    row = kv_head * 0
    value_row = kv_head * 0
    width = kv_head * 0
    ring_start = kv_head * 0
    if RING or MIDDLE_RING:  # the ring's oldest token read is at this phase, reduced to one period here
        ring_start = tl.load(ring_start_ptr + batch * stride_ls).to(tl.int32)
        if RING:
            ring_start = ring_start % (window_tokens - sink)
        else:
            ring_start = ring_start % middle_tokens
    for g in tl.static_range(NUM_GROUPS):
        i = tl.arange(0, BLOCK_G)
        heads = tl.load(heads_ptrs[g] + i, mask=i < group_rows[g], other=-1).to(tl.int32)
        hit = heads == kv_head
        found = tl.max(hit.to(tl.int32), 0) > 0
        group = tl.where(found, g, group)
        row = tl.where(found, tl.sum(tl.where(hit, i, 0), 0), row)
        width = tl.where(found, group_widths[g], width)
        value_row += tl.sum(((heads >= 0) & (heads < kv_head)).to(tl.int32), 0)
    if VALUES_BY_HEAD:
        value_row = kv_head

    # the row's tokens in each region
    window = 0
    if HAS_WINDOW:
        window = window_tokens
        if HAS_LENGTHS:
            window = tl.load(window_lengths_ptr + batch * stride_lw).to(tl.int32)
    row_middle = middle_tokens
    if HAS_LENGTHS:
        row_middle = tl.load(middle_lengths_ptr + batch * stride_lm).to(tl.int32)
    middle = row_middle
    if not UNIFORM_REST:
        middle = tl.where(group >= 0, middle, 0)  # a streaming head has no middle

    # This head's share of the S splits, in proportion to the bytes it reads (the widest head takes
    # all S, a narrower head leaves the rest of its programs idle), then the window's share of those.
    window_bytes = window.to(tl.float32) * (head_dim + value_dim)
    head_bytes = window_bytes + middle.to(tl.float32) * (width + value_dim)
    widest_bytes = window_bytes + tl.where(widest_middle >= 0, row_middle.to(tl.float32) * (widest_middle + value_dim), 0)
    both = (window > 0) & (middle > 0)
    head_splits = tl.ceil(num_splits * head_bytes / tl.maximum(widest_bytes, 1.0)).to(tl.int32)
    head_splits = tl.minimum(tl.maximum(head_splits, 1 + both.to(tl.int32)), num_splits)
    shared = tl.floor(head_splits * window_bytes / tl.maximum(head_bytes, 1.0) + 0.5).to(tl.int32)
    shared = tl.minimum(tl.maximum(shared, 1), head_splits - 1)
    window_splits = tl.where(middle == 0, head_splits, tl.where(window == 0, 0, shared))
    if split < head_splits:
        in_window = split < window_splits
        tokens = tl.where(in_window, window, middle)
        piece_index = tl.where(in_window, split, split - window_splits)
        pieces = tl.where(in_window, window_splits, head_splits - window_splits)
        piece = tl.cdiv(tl.cdiv(tokens, pieces), PIECE_UNIT) * PIECE_UNIT
        start = piece_index * piece
        end = tl.minimum(start + piece, tokens)

        h = tl.arange(0, BLOCK_H)
        q_heads = kv_head * group_size + h
        head_ok = h < group_size
        q_base = q_ptr + batch * stride_qb + q_heads[:, None] * stride_qh
        row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        v_middle = v_middle_ptr + batch * stride_vmb + value_row * stride_vmh
        if HAS_WINDOW:
            if in_window:
                c = tl.arange(0, BLOCK_D)
                q_block = tl.load(q_base + c[None, :] * stride_qd, mask=head_ok[:, None] & (c < head_dim)[None, :],
                                  other=0.0)
                row_max, row_sum, acc = _online_softmax(
                    q_block, k_window_ptr + batch * stride_kwb + kv_head * stride_kwh, stride_kwt, stride_kwd,
                    head_dim, v_window_ptr + batch * stride_vwb + kv_head * stride_vwh, stride_vwt, stride_vwd,
                    value_dim, start, end, qk_scale, sink, ring_start, window_tokens - sink,
                    True, RING, EXACT_FP32, BLOCK_H, BLOCK_D, BLOCK_DV, BLOCK_N,
                )  # fmt: skip
        if UNIFORM_REST:
            if (not in_window) & (group < 0):
                row_max, row_sum, acc = _online_softmax(
                    row_max, v_middle, 0, 0, 0, v_middle, stride_vmt, stride_vmd, value_dim, start, end, qk_scale,
                    0, ring_start, middle_tokens, False, MIDDLE_RING, EXACT_FP32, BLOCK_H, _UNIFORM_BLOCK_W, BLOCK_DV,
                    BLOCK_N_UNIFORM,
                )  # fmt: skip
        for g in tl.static_range(NUM_GROUPS):
            if (not in_window) & (group == g):
                c = tl.arange(0, BLOCK_WS[g])
                channel_ok = c < group_widths[g]
                channels = tl.load(channels_ptrs[g] + row * channels_strides[g][0] + c * channels_strides[g][1],
                                   mask=channel_ok, other=0)
                q_block = tl.load(q_base + channels[None, :] * stride_qd,
                                  mask=head_ok[:, None] & channel_ok[None, :], other=0.0)
                k_base = k_middle_ptrs[g] + batch * k_middle_strides[g][0] + row * k_middle_strides[g][1]
                row_max, row_sum, acc = _online_softmax(
                    q_block, k_base, k_middle_strides[g][2], k_middle_strides[g][3], group_widths[g],
                    v_middle, stride_vmt, stride_vmd, value_dim,
                    start, end, qk_scale, 0, ring_start, middle_tokens, True, MIDDLE_RING, EXACT_FP32, BLOCK_H,
                    BLOCK_WS[g], BLOCK_DV, BLOCK_NS[g],
                )  # fmt: skip

        d = tl.arange(0, BLOCK_DV)
        partial = batch * stride_pb + q_heads * stride_ph + split * stride_ps
        tl.store(max_ptr + partial, row_max, mask=head_ok)
        tl.store(sum_ptr + partial, row_sum, mask=head_ok)
        acc_at = acc_ptr + batch * stride_ab + q_heads[:, None] * stride_ah + split * stride_as + d[None, :] * stride_ad
        tl.store(acc_at, acc, mask=head_ok[:, None] & (d < value_dim)[None, :])

        tl.debug_barrier()  # every thread's slot stored before the release below
        finished = tl.atomic_add(counters_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if finished == head_splits - 1:
            _combine(max_ptr, sum_ptr, acc_ptr, out_ptr, batch, kv_head, head_splits, group_size, value_dim,
                     stride_pb, stride_ph, stride_ps, stride_ab, stride_ah, stride_as, stride_ad,
                     stride_ob, stride_oh, stride_od, COMBINE_H, BLOCK_DV, COMBINE_SLOTS)


@triton.jit
def _combine(
    max_ptr, sum_ptr, acc_ptr, out_ptr, batch, kv_head, num_slots, group_size, value_dim,
    stride_pb, stride_ph, stride_ps, stride_ab, stride_ah, stride_as, stride_ad, stride_ob, stride_oh, stride_od,
    COMBINE_H: tl.constexpr, BLOCK_DV: tl.constexpr, COMBINE_SLOTS: tl.constexpr,
):  # fmt: skip
    """The output of one KV head's query heads: its slots combined by log-sum-exp, COMBINE_SLOTS
    at a time (one round of independent loads each, not one per slot)."""
    h = tl.arange(0, COMBINE_H)
    d = tl.arange(0, BLOCK_DV)
    head_ok = h < group_size
    q_heads = kv_head * group_size + h
    run_max = tl.full([COMBINE_H], float("-inf"), tl.float32)
    run_sum = tl.zeros([COMBINE_H], tl.float32)
    out = tl.zeros([COMBINE_H, BLOCK_DV], tl.float32)
    for first in range(0, num_slots, COMBINE_SLOTS):
        s = first + tl.arange(0, COMBINE_SLOTS)
        ok = (s < num_slots)[:, None] & head_ok[None, :]  # (slots, heads)
        partial = batch * stride_pb + q_heads[None, :] * stride_ph + s[:, None] * stride_ps
        slot_max = tl.load(max_ptr + partial, mask=ok, other=float("-inf"), cache_modifier=".cg")
        slot_sum = tl.load(sum_ptr + partial, mask=ok, other=0.0, cache_modifier=".cg")
        acc_at = (acc_ptr + batch * stride_ab + q_heads[None, :, None] * stride_ah + s[:, None, None] * stride_as
                  + d[None, None, :] * stride_ad)
        slot_acc = tl.load(acc_at, mask=ok[:, :, None] & (d < value_dim)[None, None, :], other=0.0,
                           cache_modifier=".cg")
        new_max = tl.maximum(run_max, tl.max(slot_max, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing seen yet: weights 0, no NaN
        old_weight = tl.exp2(run_max - shift)
        slot_weight = tl.exp2(slot_max - shift[None, :])
        run_sum = run_sum * old_weight + tl.sum(slot_sum * slot_weight, 0)
        out = out * old_weight[:, None] + tl.sum(slot_acc * slot_weight[:, :, None], 0)
        run_max = new_max
    out = out / tl.where(head_ok, run_sum, 1.0)[:, None]  # padding rows: no 0 / 0
    out_at = out_ptr + batch * stride_ob + q_heads[:, None] * stride_oh + d[None, :] * stride_od
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (d < value_dim)[None, :])


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
    window_start: torch.Tensor | None = None,
    block_tokens: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """`windowed_attention(q, ..., mask=None, is_causal=False, sink, window_lengths, middle_lengths,
    window_start)` for one query token.

    q (B, Hq, 1, D); window (B, Hkv, Tw, D/Dv); k_middle[g] (B, G_g, M, w_g) of KV heads heads[g]
    keeping channels[g]; v_middle (B, Hm, M, Dv) of the non-streaming heads, ascending. Returns
    (B, Hq, 1, Dv) in v_window's dtype. `sink` does not change the result without a mask.
    `window_lengths` and `middle_lengths` ((B,) each, both or neither): row b reads only window
    slots [0, window_lengths[b]) (at least 1) and middle slots [0, middle_lengths[b]); Tw and M are
    then capacities. `window_start` (B,), with lengths: the window's slots after the first `sink`
    are a ring, its logical slot j >= sink at sink + (j - sink + window_start[b]) % (Tw - sink).
    `block_tokens` (tokens per inner step) and `splits` (programs per sequence and
    KV head; default: enough to fill the device) are tuning knobs, exposed for tests.
    """
    _check_decode(q, [k_window, v_window, v_middle, *k_middle], window_lengths, middle_lengths,
                  *([window_start] if window_start is not None else []))
    return _launch(
        q, scale, block_tokens, splits, window=_Window(k_window, v_window, window_lengths, window_start, sink),
        middle=_Middle(k_middle, heads, channels, v_middle, middle_lengths, values_by_head=False, uniform_rest=False),
    )  # fmt: skip


def pruned_decode(
    q: torch.Tensor,
    k_groups: list[torch.Tensor],
    heads: list[torch.Tensor],
    channels: list[torch.Tensor],
    v: torch.Tensor,
    scale: float,
    *,
    lengths: torch.Tensor | None = None,
    window: int = 0,
    block_tokens: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """`pruned_attention(q, ..., mask=None, is_causal=False, lengths, window)` for one query token.

    q (B, Hq, 1, D); k_groups[g] (B, G_g, T, w_g) of KV heads heads[g] keeping channels[g];
    v (B, Hkv, T, Dv). KV heads in no group attend uniformly. Returns (B, Hq, 1, Dv) in v's dtype.
    `lengths` (B,): row b reads only slots [0, lengths[b]) (at least 1); T is then a capacity.
    `window` (with lengths): k_groups and v are rings (ops.py), the query sees its last `window` tokens.
    Tuning knobs as in `windowed_decode`.
    """
    _check_decode(q, [v, *k_groups], lengths)
    visible, ring_start = _ring_reads(lengths, window, v.shape[2])
    middle = _Middle(k_groups, heads, channels, v, visible, values_by_head=True, uniform_rest=True,
                     ring_start=ring_start)
    return _launch(q, scale, block_tokens, splits, window=None, middle=middle)


def dense_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    lengths: torch.Tensor | None = None,
    window: int = 0,
    block_tokens: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """`attention(q, k, v, mask=None, scale, is_causal=False, lengths, window)` for one query token:
    q (B, Hq, 1, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv); the whole sequence is one window (a ring
    with `window`)."""
    _check_decode(q, [k, v], lengths)
    visible, ring_start = _ring_reads(lengths, window, k.shape[2])
    return _launch(q, scale, block_tokens, splits, window=_Window(k, v, visible, ring_start), middle=None)


def _ring_reads(lengths: torch.Tensor | None, window: int, capacity: int):
    """(tokens the query reads, the ring slot of the oldest) of rings written in place, on the
    device: the row's last `window` tokens, which a ring of capacity >= window still holds;
    (lengths, None) without a window."""
    if not window:
        return lengths, None
    if lengths is None:
        raise ValueError("a sliding window comes with lengths (its cache is a ring written in place)")
    if capacity < window:
        raise ValueError(f"a ring of {capacity} slots cannot hold the {window} tokens a query with a window of "
                         f"{window} sees")
    visible = lengths.clamp(max=window)
    return visible, (lengths - visible) % capacity


@dataclass
class _Window:
    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor | None
    ring_start: torch.Tensor | None = None  # see windowed_decode's window_start
    sink: int = 0


@dataclass
class _Middle:
    keys: list[torch.Tensor]
    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    values: torch.Tensor
    lengths: torch.Tensor | None
    values_by_head: bool  # values hold every KV head (pruned), or only the grouped ones (windowed)
    uniform_rest: bool  # heads in no group attend uniformly over the values (pruned), or have no middle
    ring_start: torch.Tensor | None = None  # a ring's oldest slot read (a sliding layer's cache)


def _launch(q, scale, block_tokens, splits, *, window: _Window | None, middle: _Middle | None) -> torch.Tensor:
    batch, num_q_heads = q.shape[:2]
    some = window or middle
    values = some.values
    num_kv_heads = window.keys.shape[1] if window is not None else values.shape[1]
    group_size = num_q_heads // num_kv_heads
    value_dim = values.shape[-1]
    block = _block(block_tokens)
    window_tokens = window.keys.shape[2] if window is not None else 0
    middle_tokens = middle.values.shape[2] if middle is not None else 0
    groups = len(middle.keys) if middle is not None else 0
    if splits is None:
        tokens = window_tokens + middle_tokens
        splits = math.ceil(PROGRAMS_PER_SM * _num_sms(q.device) / (batch * num_kv_heads))
        splits = max(min(splits, math.ceil(tokens / MIN_PIECE)), math.ceil(tokens / MAX_PIECE))
    splits = max(splits, 2 if window is not None and groups else 1)  # a split for each region

    row_max = torch.empty(batch, num_q_heads, splits, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    acc = torch.empty(batch, num_q_heads, splits, value_dim, dtype=torch.float32, device=q.device)
    counters = torch.zeros(batch * num_kv_heads, dtype=torch.int32, device=q.device)
    out = torch.empty(batch, num_q_heads, 1, value_dim, dtype=values.dtype, device=q.device)

    unused = values  # any valid pointer, for arguments a constexpr flag leaves unread
    if groups:
        k_middle, heads = tuple(middle.keys), tuple(h.to(q.device).contiguous() for h in middle.heads)
        channels = tuple(c.to(q.device) for c in middle.channels)
    else:  # one unread placeholder: Triton takes no empty tuple
        k_middle, heads, channels = (unused,), (unused,), (unused,)
    group_rows = tuple(h.shape[0] for h in heads) if groups else (0,)
    group_widths = tuple(k.shape[-1] for k in k_middle) if groups else (0,)
    if middle is None or not (groups or middle.uniform_rest):
        widest_middle = -1
    else:  # uniform heads read width-0 keys
        widest_middle = max(group_widths) if groups else 0
    combine_h = triton.next_power_of_2(group_size)
    uniform_rest = middle is not None and middle.uniform_rest
    growth = NARROW_BLOCK_GROWTH if batch * num_kv_heads * splits <= PROGRAMS_PER_SM * _num_sms(q.device) else 1
    narrow_blocks = [_narrow_block(w, q.shape[-1], value_dim, block, growth) for w in group_widths]
    uniform_block = _narrow_block(0, q.shape[-1], value_dim, block, growth)
    # the one ring's phase (a window's or a sliding layer's middle), else any valid pointer
    ring_start = _field(window, "ring_start", None)
    ring_start = _field(middle, "ring_start", unused) if ring_start is None else ring_start
    lengths = [x.lengths for x in (window, middle) if x is not None]
    has_lengths = any(x is not None for x in lengths)

    _decode_kernel[(batch * num_kv_heads, splits)](
        q, _field(window, "keys", unused), _field(window, "values", unused), _field(window, "lengths", unused),
        ring_start, _field(window, "sink", 0),
        k_middle, heads, channels, _field(middle, "values", unused), _field(middle, "lengths", unused),
        row_max, row_sum, acc, counters, out,
        num_kv_heads, splits, window_tokens, middle_tokens, group_size, q.shape[-1], value_dim, widest_middle,
        scale * _LOG2E,
        group_rows, group_widths,
        q.stride(0), q.stride(1), q.stride(3),
        *(window.keys.stride() if window is not None else (0,) * 4),
        *(window.values.stride() if window is not None else (0,) * 4),
        tuple(k.stride() for k in k_middle), tuple(c.stride() if c.dim() == 2 else (0, 0) for c in channels),
        *(middle.values.stride() if middle is not None else (0,) * 4),
        _stride_of(window), _stride_of(middle), ring_start.stride(0),
        *row_max.stride(),
        *acc.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        HAS_WINDOW=window is not None,
        NUM_GROUPS=groups,
        UNIFORM_REST=uniform_rest,
        VALUES_BY_HEAD=middle is not None and middle.values_by_head,
        HAS_LENGTHS=has_lengths,
        RING=window is not None and window.ring_start is not None,
        MIDDLE_RING=middle is not None and middle.ring_start is not None,
        EXACT_FP32=_exact_fp32(q.dtype),
        BLOCK_H=_block(group_size),
        BLOCK_D=_block(q.shape[-1]),
        BLOCK_WS=tuple(_block(w) for w in group_widths),
        BLOCK_G=triton.next_power_of_2(max(group_rows)),
        BLOCK_DV=_block(value_dim),
        BLOCK_N=block,
        BLOCK_NS=tuple(narrow_blocks),
        BLOCK_N_UNIFORM=uniform_block,
        PIECE_UNIT=max([block, *(narrow_blocks if groups else ()), *((uniform_block,) if uniform_rest else ())]),
        COMBINE_H=combine_h,
        COMBINE_SLOTS=max(1, min(triton.next_power_of_2(splits), _COMBINE_ELEMENTS // (combine_h * _block(value_dim)))),
    )  # fmt: skip
    return out


def _field(region, name: str, default):
    """region.name, or `default` when there is no region or the field is None."""
    value = getattr(region, name, None)
    return value if value is not None else default


def _stride_of(region) -> int:
    return region.lengths.stride(0) if region is not None and region.lengths is not None else 0


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


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _block(size: int) -> int:
    """A power of two >= size and >= tl.dot's minimum (16)."""
    return max(_MIN_DOT, triton.next_power_of_2(max(size, 1)))


def _narrow_block(width: int, head_dim: int, value_dim: int, block: int, growth: int) -> int:
    """Tokens per block of a region keeping `width` K channels: the power of two nearest to the
    count whose bytes match a full-width block's, within [block, growth * block]."""
    matched = block * (head_dim + value_dim) / (width + value_dim)
    return max(block, min(2 ** round(math.log2(matched)), growth * block))


def _exact_fp32(dtype) -> bool:
    # fp32 multiplies exactly (no TF32); bf16 too under the interpreter, whose tl.dot would
    # multiply bf16's uint16 storage as integers
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)
