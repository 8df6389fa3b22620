"""The programs a tiny model goes through on its way to a K-pruned runtime, built the way
`kvcompile.transform` builds them, for pass tests and golden printouts."""

from __future__ import annotations

import functools

import torch

from kvcompile import Plan, capture
from kvcompile.capture import clone_program
from kvcompile.passes import PassManager, canonicalize_attention, prune_k_channels

# Widths 8 and 4 in layer 0 (two width groups); layer 1, when present, keeps all channels.
GOLDEN_PLAN = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [5, 6, 12, 13]]})


def pipeline(model: torch.nn.Module, plan: Plan) -> dict[str, torch.fx.GraphModule]:
    captured = capture(model)
    canonical = PassManager([canonicalize_attention])(clone_program(captured))
    prune = functools.partial(prune_k_channels, plan=plan)
    return {
        "captured": captured,
        "canonicalize_attention": canonical,
        "prune_k_channels.prefill": PassManager([functools.partial(prune, phase="prefill")])(clone_program(canonical)),
        "prune_k_channels.decode": PassManager([functools.partial(prune, phase="decode")])(clone_program(canonical)),
    }
