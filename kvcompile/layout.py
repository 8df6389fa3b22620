"""The compressed cache's layout under a plan: its entries, their names and what each holds.

Layout of one layer's K under a K-channel plan: KV heads grouped by kept width, widest first; a
group of G heads keeping w channels each is one entry `key.{l}.w{w}` (B, G, T, w). Heads that keep
no channel hold no K. V stays `value.{l}` (B, Hkv, T, D). Nothing is padded between heads, so the
bytes held are exactly the plan's count. Layers the plan leaves alone keep `key.{l}`/`value.{l}`.

With windows (`plan.sink` or `plan.recent` > 0) a planned layer has two regions:

    key_window.{l}, value_window.{l}  (B, Hkv, Tw, D)  every channel of every head: the first
                                      `sink` tokens, then the latest ones (recent, not yet moved)
    key.{l}.w{w}                      (B, G, M, w)     the middle tokens' kept channels, per group
    value.{l}                         (B, Hm, M, D)    the middle tokens' V of the non-streaming
                                      heads (`plan.middle_value_heads`); Hm may be 0

The middle holds tokens [sink, sink + M), M = `plan.middle_length(T)`; tokens move from the window
to the middle `plan.buffer` at a time, as LeanK flushes its buffer (cache.py).

A sliding-window layer (`shape.window(l)`) has the entries of a layer without windows, each a RING:
token t of a row sits in slot t % C of its C slots, C >= window - 1 + the tokens of a call, so a
call overwrites only tokens no query of it or after it attends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import ModelShape, Plan

FULL, WINDOW, MIDDLE, RING = "full", "window", "middle", "ring"


@dataclass(frozen=True)
class KGroup:
    """KV heads of one layer that keep the same number of key channels."""

    width: int
    heads: tuple[int, ...]
    channels: tuple[tuple[int, ...], ...]  # kept channels of each head in `heads`

    def heads_tensor(self) -> torch.Tensor:
        return torch.tensor(self.heads, dtype=torch.int64)

    def channels_tensor(self) -> torch.Tensor:
        return torch.tensor(self.channels, dtype=torch.int64).view(len(self.heads), self.width)


def k_groups(plan: Plan, layer: int) -> tuple[KGroup, ...]:
    """The width groups of a planned layer, widest first; heads keeping nothing are left out."""
    per_head = plan.k_channels[layer]
    widths = sorted({len(ids) for ids in per_head if ids}, reverse=True)
    groups = []
    for width in widths:
        heads = tuple(h for h, ids in enumerate(per_head) if len(ids) == width)
        groups.append(KGroup(width, heads, tuple(per_head[h] for h in heads)))
    return tuple(groups)


def key_entry(layer: int, width: int | None = None) -> str:
    return f"key.{layer}" if width is None else f"key.{layer}.w{width}"


def value_entry(layer: int) -> str:
    return f"value.{layer}"


def key_window_entry(layer: int) -> str:
    return f"key_window.{layer}"


def value_window_entry(layer: int) -> str:
    return f"value_window.{layer}"


def entry_layer(entry: str) -> int:
    """The layer of a cache entry name (`key.3.w32` -> 3)."""
    return int(entry.split(".")[1])


def entry_kind(entry: str) -> str:
    """What an entry holds: `key`, `value`, `key_window` or `value_window`."""
    return entry.partition(".")[0]


def entry_region(plan: Plan, shape: ModelShape, entry: str) -> str:
    """Which token count an entry's rows follow: WINDOW (a full-channel window), MIDDLE (the pruned
    middle of a windowed layer), RING (a sliding layer's last tokens) or FULL (every token of the row)."""
    if shape.window(entry_layer(entry)) is not None:
        return RING
    if entry_kind(entry) in ("key_window", "value_window"):
        return WINDOW
    if plan.windowed and entry_layer(entry) in plan.k_channels:
        return MIDDLE
    return FULL


def layer_entry_names(plan: Plan, layer: int) -> list[str]:
    """The entries one layer keeps, in the order its static cache and the backend's pass agree on:
    a windowed layer's windows, then keys (width groups, widest first), then values."""
    if layer not in plan.k_channels:
        return [key_entry(layer), value_entry(layer)]
    windows = [key_window_entry(layer), value_window_entry(layer)] if plan.windowed else []
    return windows + [key_entry(layer, group.width) for group in k_groups(plan, layer)] + [value_entry(layer)]


def layer_entries(plan: Plan, layer: int, shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(heads, channels per token) of each of `layer_entry_names`."""
    heads, width = plan.kv_heads(layer, shape)
    sizes = {key_entry(layer, group.width): (len(group.heads), group.width)
             for group in (k_groups(plan, layer) if layer in plan.k_channels else ())}
    if plan.windowed and layer in plan.k_channels:
        sizes[value_entry(layer)] = (len(plan.middle_value_heads(layer)), width)
    return {name: sizes.get(name, (heads, width)) for name in layer_entry_names(plan, layer)}
