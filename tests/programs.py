"""The programs a tiny model goes through on its way to a compressed runtime, built the way
`kvcompile.transform` builds them, for pass tests and golden printouts."""

from __future__ import annotations

import functools

import torch

from kvcompile import Plan, Recipe, calibrate, capture
from kvcompile.capture import clone_program
from kvcompile.passes import PassManager, canonicalize_attention, merge_kv_heads, prune_k_channels

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


def merged_programs(model: torch.nn.Module) -> dict[str, torch.fx.GraphModule]:
    """The canonical program after merging each layer's KV heads into one, in both RoPE modes."""
    canonical = PassManager([canonicalize_attention])(capture(model))
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    programs = {}
    for rope in ("commute", "post"):
        plan = calibrate(model, Recipe(kv_group_size=model.config.num_key_value_heads, rope=rope), tokens, progress=False)
        merge = PassManager([functools.partial(merge_kv_heads, plan=plan)])
        programs[f"merge_kv_heads.{rope}"] = merge(clone_program(canonical))
    return programs
