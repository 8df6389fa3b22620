"""The CUDA face of `kvcompile::write_tokens`: every entry a layer writes at a step, one launch.

A decode step of a compressed cache writes its token to several entries per layer (each K width
group's kept channels, the values, a windowed layer's window): as separate scatters that is a
kernel each, and at batch 1 a kernel's fixed cost is most of its time. Here one program per
(row, new token, entry row g) gathers row g of each entry (an entry's rows are the KV heads it
holds) from the new K or V and stores it at the entry's slot: the entries are a tuple the kernel
unrolls over, so a program's loads are independent of each other and overlap.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _write_tokens_kernel(
    cache_ptrs, source_ptrs, heads_ptrs, channels_ptrs, slots_ptrs,
    cache_strides, source_strides, channels_strides, slots_strides, rows, widths, seq,
    NUM: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = tl.program_id(1)
    batch = (pid // seq).to(tl.int64)
    token = pid % seq
    for i in tl.static_range(NUM):
        if g < rows[i]:
            c = tl.arange(0, BLOCKS[i])
            in_row = c < widths[i]
            slot = tl.load(slots_ptrs[i] + batch * slots_strides[i][0] + token * slots_strides[i][1]).to(tl.int64)
            head = tl.load(heads_ptrs[i] + g).to(tl.int64)
            channel = tl.load(channels_ptrs[i] + g * channels_strides[i][0] + c * channels_strides[i][1],
                              mask=in_row, other=0)
            source = source_ptrs[i] + batch * source_strides[i][0] + token * source_strides[i][2]
            x = tl.load(source + head * source_strides[i][1] + channel * source_strides[i][3], mask=in_row)
            cache = cache_ptrs[i] + batch * cache_strides[i][0] + slot * cache_strides[i][2]
            tl.store(cache + g * cache_strides[i][1] + c * cache_strides[i][3], x, mask=in_row)


def write_tokens(caches, sources, heads, channels, slots) -> None:
    """`kvcompile::write_tokens` on CUDA tensors (see the op)."""
    batch, seq = slots[0].shape
    heads = tuple(h.contiguous() for h in heads)
    rows = tuple(h.shape[0] for h in heads)
    _write_tokens_kernel[(batch * seq, max(rows))](
        tuple(caches), tuple(sources), heads, tuple(channels), tuple(slots),
        tuple(c.stride() for c in caches), tuple(s.stride() for s in sources),
        tuple(c.stride() for c in channels), tuple(s.stride() for s in slots),
        rows, tuple(c.shape[-1] for c in channels), seq,
        NUM=len(caches), BLOCKS=tuple(triton.next_power_of_2(c.shape[-1]) for c in channels),
    )  # fmt: skip
