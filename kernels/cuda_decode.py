"""Decode attention on CUDA: the Triton kernels where they compute the op exactly, the reference
elsewhere.

Registered as the CUDA kernels of `kvcompile::pruned_attention` and `kvcompile::windowed_attention`
(and of `kvcompile::write_tokens`, a step's cache writes in one launch: triton_write.py),
so one program runs the reference on CPU and Triton on a GPU, decided per call by the tensors'
device (the dispatcher is the lowering). The kernels take one query token and no mask.
`kvcompile::attention` over a cache written in place (layers a plan leaves whole, merged heads) is
the same kernel with the whole sequence as its window.

A decode step over a cache written in place passes per-row lengths instead of a mask: the one
token sees each row's first lengths[b] slots, which the kernels bound on the device, so such a call
goes to Triton without a look at any tensor's values. A decode step of a kvcompile program without
lengths has a mask, built from positions, that lets its one token see every cached key; the call
checks that the mask allows every key before dropping it (one device sync per call), so a caller
passing a real mask still gets the reference.
"""

from __future__ import annotations

import torch

from .ops import (
    attention,
    attention_reference,
    check_lengths_arguments,
    pruned_attention,
    pruned_attention_reference,
    windowed_attention,
    windowed_attention_reference,
    write_tokens,
    write_tokens_reference,
)


def _attends_everything(mask: torch.Tensor | None, is_causal: bool) -> bool:
    if is_causal:  # SDPA's top-left convention: the one query token would see key 0 only
        return False
    if mask is None:  # also every call with lengths (checked): nothing to synchronise on
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _triton_applies(q: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dtypes) -> bool:
    try:
        from . import triton_decode
    except ImportError:  # a CUDA machine without triton: the reference still computes the op
        return False
    return (triton_decode.supported(q, None) and all(dtype == q.dtype for dtype in dtypes)
            and _attends_everything(mask, is_causal))


@attention.register_kernel("cuda")
def _attention_cuda(q, k, v, mask, scale, is_causal, lengths=None, window=0):
    if lengths is not None and _triton_applies(q, mask, is_causal, [k.dtype, v.dtype]):
        from .triton_decode import dense_decode

        return dense_decode(q, k, v, scale, lengths=lengths, window=window)
    return attention_reference(q, k, v, mask, scale, is_causal, lengths, window)


@pruned_attention.register_kernel("cuda")
def _pruned_attention_cuda(q, k_groups, heads, channels, v, mask, scale, is_causal, lengths=None, window=0):
    check_lengths_arguments("kvcompile::pruned_attention", q, mask, is_causal, lengths)
    if _triton_applies(q, mask, is_causal, [v.dtype, *(k.dtype for k in k_groups)]):
        from .triton_decode import pruned_decode

        return pruned_decode(q, k_groups, heads, channels, v, scale, lengths=lengths, window=window)
    return pruned_attention_reference(q, k_groups, heads, channels, v, mask, scale, is_causal, lengths, window)


@windowed_attention.register_kernel("cuda")
def _windowed_attention_cuda(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale, is_causal, sink,
                             window_lengths=None, middle_lengths=None, window_start=None):
    check_lengths_arguments("kvcompile::windowed_attention", q, mask, is_causal, window_lengths, middle_lengths)
    if _triton_applies(q, mask, is_causal, [k_window.dtype, v_window.dtype, v_middle.dtype, *(k.dtype for k in k_middle)]):
        from .triton_decode import windowed_decode

        return windowed_decode(q, k_window, v_window, k_middle, heads, channels, v_middle, scale, sink,
                               window_lengths=window_lengths, middle_lengths=middle_lengths, window_start=window_start)
    return windowed_attention_reference(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale,
                                        is_causal, sink, window_lengths, middle_lengths, window_start)


@write_tokens.register_kernel("cuda")
def _write_tokens_cuda(caches, sources, heads, channels, slots):
    try:
        from .triton_write import write_tokens as triton_write_tokens
    except ImportError:  # a CUDA machine without triton
        triton_write_tokens = None
    if triton_write_tokens is None or any(c.dtype != s.dtype for c, s in zip(caches, sources)):
        return write_tokens_reference(caches, sources, heads, channels, slots)
    triton_write_tokens(caches, sources, heads, channels, slots)
