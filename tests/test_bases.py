"""bases: KV-head merges from second-moment statistics, and their commutation with RoPE."""

from functools import cache

import pytest
import torch

from kvcompile.calibration.bases import (
    Merge,
    commuting_merge,
    down_for_head,
    mean_pool_merge,
    relative_error,
    svd_merge,
    up_for_head,
)
from kvcompile.rope import RopeLayout, apply_rope, rotary_pairs

T, D = 4, 16
TOKENS = 2048
THETA = 10000.0
LAYOUTS = [
    RopeLayout("rotate_half", D),
    RopeLayout("interleaved", D),
    RopeLayout("rotate_half", D // 2),
    RopeLayout("interleaved", D // 2),
]
layouts = pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.kind}-r{l.rotary_dims}")


def pre_rope_keys(seed: int, heads: int = T, own: float = 0.5) -> torch.Tensor:
    """(tokens, heads, D) float64 keys like a real group's: low rank plus noise, a common offset,
    uneven channel scales, and heads that share most of their structure (`own` sets how much
    each head differs), so that merging them is meaningful."""
    g = torch.Generator().manual_seed(seed)
    rank = 24
    latent = torch.randn(TOKENS, rank, generator=g, dtype=torch.float64)
    shared = torch.randn(rank, 1, D, generator=g, dtype=torch.float64)
    mixing = shared + own * torch.randn(rank, heads, D, generator=g, dtype=torch.float64)
    offset = torch.randn(D, generator=g, dtype=torch.float64)
    scales = 0.2 + 3 * torch.rand(D, generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(TOKENS, heads, D, generator=g, dtype=torch.float64)
    return (torch.einsum("nr,rhd->nhd", latent, mixing) + offset) * scales + noise


def random_positions(seed: int, tokens: int = TOKENS) -> torch.Tensor:
    return torch.randint(0, 8192, (tokens,), generator=torch.Generator().manual_seed(seed))


def rows(per_head: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, D) -> group row vectors (tokens, heads·D)."""
    return per_head.reshape(per_head.shape[0], -1)


def heads(group_rows: torch.Tensor) -> torch.Tensor:
    """group row vectors (tokens, heads·D) -> (tokens, heads, D)."""
    return group_rows.reshape(group_rows.shape[0], -1, D)


def post_rope_rows(keys: torch.Tensor, layout: RopeLayout, seed: int = 1) -> torch.Tensor:
    return rows(apply_rope(keys, random_positions(seed), layout, THETA))


def second_moment(group_rows: torch.Tensor) -> torch.Tensor:
    return group_rows.T @ group_rows


@cache
def calibration(layout: RopeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared test data: post-RoPE group rows of `pre_rope_keys(0)` and their second moment."""
    keys = post_rope_rows(pre_rope_keys(0), layout)
    return keys, second_moment(keys)


def measured_error(group_rows: torch.Tensor, merge: Merge) -> float:
    residual = group_rows - group_rows @ merge.down.double() @ merge.up.double()
    return float(residual.square().sum() / group_rows.square().sum())


def merges(cov: torch.Tensor, s: int, layout: RopeLayout) -> dict[str, Merge]:
    return {"svd": svd_merge(cov, s, D), "commuting": commuting_merge(cov, T, s, D, layout)}


# --- apply_rope ------------------------------------------------------------------------------


def test_apply_rope_rotates_each_pair_by_its_frequency():
    x = torch.zeros(1, D, dtype=torch.float64)
    x[0, 3] = 1.0  # rotate_half with r = 8: channel 3 pairs with 7, frequency θ_3 = base^(-6/8)
    out = apply_rope(x, torch.tensor([5]), RopeLayout("rotate_half", 8), THETA)
    angle = torch.tensor(5 * THETA ** (-6 / 8), dtype=torch.float64)
    expected = torch.zeros(1, D, dtype=torch.float64)
    expected[0, 3], expected[0, 7] = angle.cos(), angle.sin()
    torch.testing.assert_close(out, expected)


def test_apply_rope_leaves_unrotated_channels_and_position_zero_alone():
    keys = pre_rope_keys(0)[:8]
    layout = RopeLayout("interleaved", D // 2)
    torch.testing.assert_close(apply_rope(keys, torch.zeros(8), layout, THETA), keys)
    rotated = apply_rope(keys, random_positions(0, 8), layout, THETA)
    torch.testing.assert_close(rotated[..., D // 2 :], keys[..., D // 2 :])


# --- exactness -------------------------------------------------------------------------------


@layouts
def test_full_size_merge_is_exact(layout):
    _, cov = calibration(layout)
    for name, merge in merges(cov, T, layout).items():
        assert relative_error(cov, merge) < 1e-10, name


@layouts
def test_duplicated_heads_merge_exactly_into_the_distinct_ones(layout):
    distinct = pre_rope_keys(0, heads=2)
    keys = torch.cat([distinct, distinct], dim=1)  # heads 2, 3 repeat heads 0, 1
    cov = second_moment(post_rope_rows(keys, layout))
    for name, merge in merges(cov, 2, layout).items():
        assert relative_error(cov, merge) < 1e-10, name


def test_data_of_rank_at_most_s_d_merges_exactly_in_svd_mode():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(TOKENS, 2 * D, generator=g, dtype=torch.float64) @ torch.randn(
        2 * D, T * D, generator=g, dtype=torch.float64
    )
    assert relative_error(second_moment(low_rank), svd_merge(second_moment(low_rank), 2, D)) < 1e-10


def per_frequency_multiples_of_one_head(layout: RopeLayout) -> torch.Tensor:
    """(tokens, T, D) keys where head h's complex number at frequency i is c_{h,i} times head 0's
    (a fixed rotation and scaling per pair) and its unrotated channels are real multiples of head 0's."""
    g = torch.Generator().manual_seed(5)
    head = pre_rope_keys(0, heads=1)[:, 0]
    first, second = rotary_pairs(layout, D)
    unrotated = torch.arange(layout.rotary_dims, D)
    z = torch.complex(head[:, first], head[:, second])
    keys = torch.empty(TOKENS, T, D, dtype=torch.float64)
    for h in range(T):
        w = z * torch.randn(len(first), generator=g, dtype=torch.complex128)
        keys[:, h, first], keys[:, h, second] = w.real, w.imag
        keys[:, h, unrotated] = head[:, unrotated] * torch.randn(len(unrotated), generator=g, dtype=torch.float64)
    return keys


@layouts
def test_heads_that_are_per_frequency_multiples_of_one_head_merge_exactly_into_one(layout):
    cov = second_moment(post_rope_rows(per_frequency_multiples_of_one_head(layout), layout))
    assert relative_error(cov, commuting_merge(cov, T, 1, D, layout)) < 1e-10
    assert relative_error(cov, mean_pool_merge(T, D)) > 0.1


def test_mean_pool_is_exact_for_identical_heads():
    keys = pre_rope_keys(0, heads=1).expand(-1, T, -1)
    cov = second_moment(post_rope_rows(keys, LAYOUTS[0]))
    assert relative_error(cov, mean_pool_merge(T, D)) < 1e-10


# --- error ordering --------------------------------------------------------------------------


@layouts
def test_error_decreases_with_merged_head_count(layout):
    _, cov = calibration(layout)
    merges_by_size = [merges(cov, s, layout) for s in range(1, T + 1)]
    for name in ("svd", "commuting"):
        by_size = [relative_error(cov, of_size[name]) for of_size in merges_by_size]
        assert all(a > b for a, b in zip(by_size, by_size[1:])), (name, by_size)


@layouts
def test_svd_beats_commuting_beats_mean_pool(layout):
    _, cov = calibration(layout)
    for s in range(1, T):
        found = {name: relative_error(cov, merge) for name, merge in merges(cov, s, layout).items()}
        assert found["svd"] <= found["commuting"] + 1e-12, (s, found)
    assert relative_error(cov, commuting_merge(cov, T, 1, D, layout)) < relative_error(cov, mean_pool_merge(T, D))


@layouts
def test_relative_error_matches_the_error_measured_on_the_keys(layout):
    keys, cov = calibration(layout)
    for merge in [*merges(cov, 2, layout).values(), mean_pool_merge(T, D)]:
        assert relative_error(cov, merge) == pytest.approx(measured_error(keys, merge), rel=1e-9)


@layouts
def test_commuting_merge_does_not_care_whether_statistics_are_pre_or_post_rope(layout):
    keys = pre_rope_keys(0)
    pre, post = second_moment(rows(keys)), second_moment(post_rope_rows(keys, layout))
    from_pre, from_post = commuting_merge(pre, T, 2, D, layout), commuting_merge(post, T, 2, D, layout)
    for cov in (pre, post):
        assert relative_error(cov, from_post) == pytest.approx(relative_error(cov, from_pre), rel=1e-6)


# --- commutation with RoPE -------------------------------------------------------------------


def _rope_then_down(keys, positions, merge, layout):
    """keys (tokens, t, D) -> (tokens, s·D): RoPE each head, then compress."""
    return rows(apply_rope(keys, positions, layout, THETA)) @ merge.down.double()


def _down_then_rope(keys, positions, merge, layout):
    """keys (tokens, t, D) -> (tokens, s·D): compress, then RoPE each sub-head."""
    return rows(apply_rope(heads(rows(keys) @ merge.down.double()), positions, layout, THETA))


def _rope_then_up(sub_heads, positions, merge, layout):
    """sub_heads (tokens, s, D) -> (tokens, t·D): RoPE each sub-head, then reconstruct."""
    return rows(apply_rope(sub_heads, positions, layout, THETA)) @ merge.up.double()


def _up_then_rope(sub_heads, positions, merge, layout):
    """sub_heads (tokens, s, D) -> (tokens, t·D): reconstruct, then RoPE each head."""
    return rows(apply_rope(heads(rows(sub_heads) @ merge.up.double()), positions, layout, THETA))


@layouts
def test_commuting_and_mean_pool_merges_commute_with_rope(layout):
    _, cov = calibration(layout)
    keys, positions = pre_rope_keys(1)[:256], random_positions(2, 256)
    g = torch.Generator().manual_seed(3)
    for merge in (commuting_merge(cov, T, 2, D, layout), mean_pool_merge(T, D)):
        sub_heads = torch.randn(256, merge.up.shape[0] // D, D, dtype=torch.float64, generator=g)
        torch.testing.assert_close(
            _rope_then_down(keys, positions, merge, layout), _down_then_rope(keys, positions, merge, layout)
        )
        torch.testing.assert_close(
            _rope_then_up(sub_heads, positions, merge, layout), _up_then_rope(sub_heads, positions, merge, layout)
        )


@layouts
def test_svd_merge_does_not_commute_with_rope(layout):
    _, cov = calibration(layout)
    merge = svd_merge(cov, 2, D)
    keys, positions = pre_rope_keys(1)[:256], random_positions(2, 256)
    gap = _rope_then_down(keys, positions, merge, layout) - _down_then_rope(keys, positions, merge, layout)
    assert gap.norm() > 0.1 * _rope_then_down(keys, positions, merge, layout).norm()


@layouts
def test_commuting_merge_has_orthonormal_columns_and_up_is_down_transposed(layout):
    _, cov = calibration(layout)
    merge = commuting_merge(cov, T, 2, D, layout)
    torch.testing.assert_close(merge.up, merge.down.T)
    torch.testing.assert_close(merge.up @ merge.down, torch.eye(2 * D), atol=1e-5, rtol=0)


# --- per-head views --------------------------------------------------------------------------


@pytest.mark.parametrize("j", range(T))
def test_projected_query_scores_the_compressed_key_like_the_reconstruction(j):
    layout = LAYOUTS[0]
    keys, cov = calibration(layout)
    merge = commuting_merge(cov, T, 2, D, layout)
    down, up = merge.down.double(), merge.up.double()
    queries = torch.randn(TOKENS, D, dtype=torch.float64, generator=torch.Generator().manual_seed(j))
    compressed = keys @ down
    projected = queries @ up_for_head(merge, j, D).double().T
    reconstructed_head_j = (compressed @ up)[:, j * D : (j + 1) * D]
    torch.testing.assert_close((projected * compressed).sum(-1), (queries * reconstructed_head_j).sum(-1))


def test_compressed_key_is_the_sum_of_per_head_projections():
    layout = LAYOUTS[0]
    keys, cov = calibration(layout)
    merge = svd_merge(cov, 2, D)
    per_head = sum(heads(keys)[:, j] @ down_for_head(merge, j, D).double() for j in range(T))
    torch.testing.assert_close(per_head, keys @ merge.down.double())


# --- validation ------------------------------------------------------------------------------

COV = second_moment(rows(pre_rope_keys(0)))
ASYMMETRIC = COV + torch.triu(torch.ones_like(COV), diagonal=1)
NAN = COV.clone().fill_diagonal_(float("nan"))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: svd_merge(COV, T + 1, D), r"s must be in \[1, t = 4\], got 5"),
        (lambda: svd_merge(COV, 0, D), r"s must be in \[1, t = 4\], got 0"),
        (lambda: svd_merge(COV[:60, :60], 1, D), r"cov must be \(t·d × t·d\) with d = 16, got \(60, 60\)"),
        (lambda: svd_merge(COV[:, :32], 1, D), r"cov must be 64 × 64, got \(64, 32\)"),
        (lambda: svd_merge(ASYMMETRIC, 1, D), "cov is not symmetric"),
        (lambda: svd_merge(NAN, 1, D), "cov has non-finite entries"),
        (lambda: commuting_merge(COV, 3, 1, D, LAYOUTS[0]), r"cov must be 48 × 48, got \(64, 64\)"),
        (lambda: commuting_merge(COV, T, 1, D, RopeLayout("rotate_half", 2 * D)), "rotary_dims 32 exceeds head_dim 16"),
        (lambda: RopeLayout("neox", D), "RoPE kind must be one of"),
        (lambda: RopeLayout("interleaved", 15), "rotary_dims must be a non-negative even number, got 15"),
        (lambda: up_for_head(mean_pool_merge(T, D), T, D), "head 4 out of range for a group of 4 heads"),
        (lambda: Merge(torch.zeros(64, 32), torch.zeros(64, 32)), r"down and up must be"),
    ],
)
def test_bad_inputs_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()
