"""RoPE as the passes and the calibration see it: which channels rotate together, and the rotation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ROPE_KINDS = ("rotate_half", "interleaved")


@dataclass(frozen=True)
class RopeLayout:
    """Which channels of a d-channel head RoPE rotates together.

    Pair i (i < rotary_dims/2) forms the complex number x_a + i·x_b rotated by pos·θ_i with
    θ_i = base^(-2i/rotary_dims); channels >= rotary_dims are not rotated.
    "rotate_half": (a, b) = (i, i + rotary_dims/2). "interleaved": (a, b) = (2i, 2i + 1).
    """

    kind: str
    rotary_dims: int

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"RoPE kind must be one of {ROPE_KINDS}, got {self.kind!r}")
        if self.rotary_dims < 0 or self.rotary_dims % 2:
            raise ValueError(f"rotary_dims must be a non-negative even number, got {self.rotary_dims}")


def rotary_pairs(layout: RopeLayout, d: int) -> tuple[Tensor, Tensor]:
    """(a, b): channel ids of each rotary pair, pair i at index i (so at frequency θ_i)."""
    check_layout_fits(layout, d)
    half = layout.rotary_dims // 2
    pair = torch.arange(half)
    if layout.kind == "rotate_half":
        return pair, pair + half
    return 2 * pair, 2 * pair + 1


def apply_rope(x: Tensor, positions: Tensor, layout: RopeLayout, theta_base: float = 10000.0) -> Tensor:
    """RoPE on row vectors x (..., d) or (..., n_heads, d), HF sign convention.

    `positions` has the leading shape of x (e.g. (tokens,) for x (tokens, n_heads, d)); its angles
    broadcast over the remaining dims. For each pair (a, b) at frequency θ_i and angle φ = pos·θ_i:
    out_a = x_a cos φ − x_b sin φ, out_b = x_b cos φ + x_a sin φ.
    """
    if positions.shape != x.shape[: positions.dim()] or positions.dim() >= x.dim():
        raise ValueError(f"positions {tuple(positions.shape)} must be a leading shape of x {tuple(x.shape[:-1])}")
    first, second = rotary_pairs(layout, x.shape[-1])
    r = layout.rotary_dims
    freqs = theta_base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = positions.to(torch.float64)[..., None] * freqs
    angles = angles.reshape(*positions.shape, *[1] * (x.dim() - 1 - positions.dim()), r // 2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    xa, xb = x[..., first], x[..., second]
    out = x.clone()
    out[..., first] = xa * cos - xb * sin
    out[..., second] = xb * cos + xa * sin
    return out


def check_layout_fits(layout: RopeLayout, d: int) -> None:
    if layout.rotary_dims > d:
        raise ValueError(f"rotary_dims {layout.rotary_dims} exceeds head_dim {d}")
