"""Decode attention on CUDA: the Triton kernels where they compute the op exactly, the reference
elsewhere.

Registered as the CUDA kernels of `kvcompile::pruned_attention` and `kvcompile::windowed_attention`,
so one program runs the reference on CPU and Triton on a GPU, decided per call by the tensors'
device (the dispatcher is the lowering). The kernels take one query token and no mask. A decode
step of a kvcompile program has a mask, built from positions, that lets its one token see every
cached key; the call checks that the mask allows every key before dropping it (one device sync per
call), so a caller passing a real mask still gets the reference.
"""

from __future__ import annotations

import torch

from .ops import pruned_attention, pruned_attention_reference, windowed_attention, windowed_attention_reference


def _attends_everything(mask: torch.Tensor | None, is_causal: bool) -> bool:
    if is_causal:  # SDPA's top-left convention: the one query token would see key 0 only
        return False
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _triton_applies(q: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dtypes) -> bool:
    try:
        from . import triton_decode
    except ImportError:  # a CUDA machine without triton: the reference still computes the op
        return False
    return (triton_decode.supported(q, None) and all(dtype == q.dtype for dtype in dtypes)
            and _attends_everything(mask, is_causal))


@pruned_attention.register_kernel("cuda")
def _pruned_attention_cuda(q, k_groups, heads, channels, v, mask, scale, is_causal):
    if _triton_applies(q, mask, is_causal, [v.dtype, *(k.dtype for k in k_groups)]):
        from .triton_decode import pruned_decode

        return pruned_decode(q, k_groups, heads, channels, v, scale)
    return pruned_attention_reference(q, k_groups, heads, channels, v, mask, scale, is_causal)


@windowed_attention.register_kernel("cuda")
def _windowed_attention_cuda(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale, is_causal, sink):
    if _triton_applies(q, mask, is_causal, [k_window.dtype, v_window.dtype, v_middle.dtype, *(k.dtype for k in k_middle)]):
        from .triton_decode import windowed_decode

        return windowed_decode(q, k_window, v_window, k_middle, heads, channels, v_middle, scale, sink)
    return windowed_attention_reference(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale,
                                        is_causal, sink)
