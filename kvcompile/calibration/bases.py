"""KV-head merging bases: project each group of t KV heads of a layer onto s <= t heads.

Pure linear algebra on calibration statistics (Yu et al. 2024, "Effectively Compress KV Heads for
LLM"; the RoPE-commuting variant follows TransMLA's RoRoPE). No graph work happens here.

Conventions (the graph passes depend on them):

* A group's key (or value) of one token is the ROW vector k_G = concat(k_1, ..., k_t) in R^{t·d}:
  heads in group order, each head's d channels in the model's channel order.
* A merge is a pair of real matrices `down` (t·d × s·d) and `up` (s·d × t·d). The compressed
  vector c = k_G @ down is s sub-heads of d channels (sub-head m = c[m·d:(m+1)·d]); the
  reconstruction is k_G ≈ c @ up.
* Statistics: C = Σ_tokens k_Gᵀ k_G, the uncentred second moment (t·d × t·d, float64),
  accumulated from post-RoPE keys (or values).

Queries. A query q (row, d) of original head j scores k_j ≈ (c @ up)_j = c @ up_j, where
up_j = up[:, j·d:(j+1)·d] (s·d × d, `up_for_head`). Hence

    q · (c @ up_j) = (q @ up_jᵀ) · c,

so each query is projected once to q' = q @ up_jᵀ (s·d) and scored directly against the cached c.
Likewise c = Σ_j k_j @ down_j with down_j = down[j·d:(j+1)·d, :] (`down_for_head`), which is how
`down` folds into the per-head key projections.

Both `svd_merge` and `commuting_merge` return down = B, up = Bᵀ for a basis B with orthonormal
columns, so down @ up is an orthogonal projection and the error is the discarded energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompile.rope import RopeLayout, rotary_pairs


@dataclass(frozen=True)
class Merge:
    """down (t·d × s·d): c = k_G @ down. up (s·d × t·d): k_G ≈ c @ up. float32."""

    down: Tensor
    up: Tensor

    def __post_init__(self):
        if self.down.dim() != 2 or self.up.shape != self.down.shape[::-1]:
            raise ValueError(
                f"down and up must be (n × k) and (k × n), got {tuple(self.down.shape)} and {tuple(self.up.shape)}"
            )


def svd_merge(cov: Tensor, s: int, d: int) -> Merge:
    """Uncentred PCA of the stacked group keys: B = top s·d eigenvectors of C (= SVD of the keys).

    Optimal among all rank-s·d maps for the statistics it was built from (Eckart–Young), but B mixes
    channels of different RoPE frequencies, so c must be computed from post-RoPE keys: it does not
    commute with RoPE. Sub-heads come in order of decreasing captured energy.
    """
    t = _group_size(cov, d)
    _check_merged_size(t, s)
    basis = _top_eigenvectors(_validated_cov(cov, t * d), s * d)
    return _orthonormal_merge(basis)


def commuting_merge(cov: Tensor, t: int, s: int, d: int, layout: RopeLayout) -> Merge:
    """The best merge that commutes with RoPE and keeps the channel layout of each sub-head.

    RoPE multiplies the complex number z_{h,i} = x_{h,a} + i·x_{h,b} of head h at frequency i by
    e^{i·pos·θ_i}, the same for every head of the group. A map that, for each frequency i, mixes
    only the z_{·,i} across heads with complex coefficients therefore commutes with it:
    w_{m,i} = Σ_h conj(V_i[h,m]) z_{h,i}, reconstructed as z_{h,i} ≈ Σ_m V_i[h,m] w_{m,i}, where V_i
    holds the top-s eigenvectors of the t×t Hermitian C_i[h,h'] = Σ z_h conj(z_h'). C_i is exactly
    invariant under RoPE (all heads of a token rotate alike), so post-RoPE statistics give the same
    basis as pre-RoPE ones. Channels >= rotary_dims are mixed across heads per channel with real
    coefficients: top-s eigenvectors of the t×t real second moment of that channel.

    As real matrices, v = V_i[h,m] = γ + iδ gives the 2×2 block of rows (h·d+a, h·d+b) and
    columns (m·d+a, m·d+b) of B = down: [[γ, −δ], [δ, γ]]; up = Bᵀ is the real form of V_i. Since
    each V_i has orthonormal columns, so does B. RoPE applied to each of c's s sub-heads equals the
    merge of RoPE'd keys, and the same holds for up.
    """
    _check_merged_size(t, s)
    cov = _validated_cov(cov, t * d)
    basis = torch.zeros(t * d, s * d, dtype=torch.float64)
    first, second = rotary_pairs(layout, d)
    head_a, head_b = _channel_ids(first, t, d), _channel_ids(second, t, d)
    sub_a, sub_b = _channel_ids(first, s, d), _channel_ids(second, s, d)
    vectors = _top_eigenvectors(_frequency_second_moments(cov, head_a, head_b), s)
    basis[_block(head_a, sub_a)] = vectors.real
    basis[_block(head_b, sub_b)] = vectors.real
    basis[_block(head_b, sub_a)] = vectors.imag
    basis[_block(head_a, sub_b)] = -vectors.imag

    unrotated = torch.arange(layout.rotary_dims, d)
    head_u, sub_u = _channel_ids(unrotated, t, d), _channel_ids(unrotated, s, d)
    basis[_block(head_u, sub_u)] = _top_eigenvectors(cov[_block(head_u, head_u)], s)
    return _orthonormal_merge(basis)


def commuting_part(matrix: Tensor, d: int, layout: RopeLayout) -> Tensor:
    """The orthogonal projection of a (a·d × b·d) map between a heads and b heads onto the maps of
    `commuting_merge`'s form, which commute with RoPE: for each frequency, the 2×2 blocks of every
    (head, head) pair become their nearest complex multiplication [[x, −y], [y, x]]; channels past
    `rotary_dims` mix with the same channel of other heads only; everything else is 0.

    Linear and differentiable: healing trains commuting maps as `commuting_part(free parameter)`.
    """
    rows, cols = matrix.shape[0] // d, matrix.shape[1] // d
    if matrix.dim() != 2 or matrix.shape != (rows * d, cols * d):
        raise ValueError(f"matrix must be (a·d × b·d) with d = {d}, got {tuple(matrix.shape)}")
    first, second = rotary_pairs(layout, d)
    block_aa = _block(_channel_ids(first, rows, d), _channel_ids(first, cols, d))
    block_bb = _block(_channel_ids(second, rows, d), _channel_ids(second, cols, d))
    block_ba = _block(_channel_ids(second, rows, d), _channel_ids(first, cols, d))
    block_ab = _block(_channel_ids(first, rows, d), _channel_ids(second, cols, d))
    real = (matrix[block_aa] + matrix[block_bb]) / 2
    imag = (matrix[block_ba] - matrix[block_ab]) / 2
    unrotated = torch.arange(layout.rotary_dims, d)
    block_u = _block(_channel_ids(unrotated, rows, d), _channel_ids(unrotated, cols, d))
    projected = torch.zeros_like(matrix)
    projected = projected.index_put(block_aa, real).index_put(block_bb, real)
    projected = projected.index_put(block_ba, imag).index_put(block_ab, -imag)
    return projected.index_put(block_u, matrix[block_u])


def mean_pool_merge(t: int, d: int) -> Merge:
    """The paper's baseline (s = 1): c = mean of the t heads, every head reconstructed as c.

    down = [I; ...; I] / t, up = [I ... I]. Acts on each channel alike, so it commutes with RoPE.
    Not a projection onto the best subspace, hence worse than `commuting_merge` with s = 1.
    """
    _check_merged_size(t, 1)
    stacked = torch.eye(d).repeat(t, 1)
    return Merge(down=stacked / t, up=stacked.T.contiguous())


def relative_error(cov: Tensor, merge: Merge) -> float:
    """E‖k − k·down·up‖² / E‖k‖² from C alone: tr((I − DU)ᵀ C (I − DU)) / tr(C), in float64."""
    n = merge.down.shape[0]
    cov = _validated_cov(cov, n)
    residual = torch.eye(n, dtype=torch.float64) - merge.down.double() @ merge.up.double()
    return float((residual * (cov @ residual)).sum() / cov.trace())


def up_for_head(merge: Merge, j: int, d: int) -> Tensor:
    """up_j (s·d × d): the columns of `up` that rebuild head j. Merged query: q' = q @ up_jᵀ."""
    _check_head(merge, j, d)
    return merge.up[:, j * d : (j + 1) * d]


def down_for_head(merge: Merge, j: int, d: int) -> Tensor:
    """down_j (d × s·d): the rows of `down` that read head j, so that c = Σ_j k_j @ down_j."""
    _check_head(merge, j, d)
    return merge.down[j * d : (j + 1) * d, :]


def _orthonormal_merge(basis: Tensor) -> Merge:
    return Merge(down=basis.float(), up=basis.T.float().contiguous())


def _top_eigenvectors(matrix: Tensor, k: int) -> Tensor:
    """Eigenvectors (columns) of the k largest eigenvalues of a (batch of) Hermitian matrix, largest first."""
    _, vectors = torch.linalg.eigh(matrix)
    return vectors[..., -k:].flip(-1)


def _frequency_second_moments(cov: Tensor, head_a: Tensor, head_b: Tensor) -> Tensor:
    """(r/2, t, t) complex C_i[h,h'] = Σ z_h conj(z_h'), z = x_a + i·x_b, from the real C.

    z_h conj(z_h') = (x_ha x_h'a + x_hb x_h'b) + i (x_hb x_h'a − x_ha x_h'b).
    """
    real = cov[_block(head_a, head_a)] + cov[_block(head_b, head_b)]
    imag = cov[_block(head_b, head_a)] - cov[_block(head_a, head_b)]
    return torch.complex(real, imag)


def _channel_ids(channels: Tensor, heads: int, d: int) -> Tensor:
    """(len(channels), heads): index in the group row vector of each channel of each head."""
    return channels[:, None] + d * torch.arange(heads)[None, :]


def _block(rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the per-channel (rows × cols) blocks of a matrix: rows (n, p), cols (n, q) -> (n, p, q)."""
    return rows[:, :, None], cols[:, None, :]


def _group_size(cov: Tensor, d: int) -> int:
    if d < 1 or cov.dim() != 2 or cov.shape[0] % d:
        raise ValueError(f"cov must be (t·d × t·d) with d = {d}, got {tuple(cov.shape)}")
    return cov.shape[0] // d


def _validated_cov(cov: Tensor, size: int) -> Tensor:
    """cov as float64, checked to be a finite symmetric (size × size) matrix, then exactly symmetrised."""
    if cov.shape != (size, size):
        raise ValueError(f"cov must be {size} × {size}, got {tuple(cov.shape)}")
    cov = cov.detach().to(torch.float64)
    if not torch.isfinite(cov).all():
        raise ValueError("cov has non-finite entries")
    if (cov - cov.T).abs().max() > 1e-8 * cov.abs().max():
        raise ValueError("cov is not symmetric")
    return (cov + cov.T) / 2


def _check_merged_size(t: int, s: int) -> None:
    if not 1 <= s <= t:
        raise ValueError(f"merged head count s must be in [1, t = {t}], got {s}")


def _check_head(merge: Merge, j: int, d: int) -> None:
    t = merge.down.shape[0] // d
    if not 0 <= j < t:
        raise ValueError(f"head {j} out of range for a group of {t} heads")
