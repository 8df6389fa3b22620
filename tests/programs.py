"""The programs a tiny model goes through on its way to a compressed runtime, from the shipped
pipeline (kvcompile/pipeline.py), for pass tests and golden printouts."""

from __future__ import annotations

import torch

from kvcompile import Plan, Recipe, calibrate, capture
from kvcompile.pipeline import canonical_program, compile_programs

# Widths 8 and 4 in layer 0 (two width groups); layer 1, when present, keeps all channels.
GOLDEN_PLAN = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [5, 6, 12, 13]]})


def pipeline(model: torch.nn.Module, plan: Plan) -> dict[str, torch.fx.GraphModule]:
    captured = capture(model)
    programs = compile_programs(captured, plan)
    return {
        "captured": captured,
        "canonicalize_attention": programs.canonical,
        "prune_k_channels.prefill": programs.prefill,
        "prune_k_channels.decode": programs.decode,
    }


def merged_programs(model: torch.nn.Module) -> dict[str, torch.fx.GraphModule]:
    """The canonical program after merging each layer's KV heads into one, in both RoPE modes."""
    captured = capture(model)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    programs = {}
    for rope in ("commute", "post"):
        plan = calibrate(model, Recipe(kv_group_size=model.config.num_key_value_heads, rope=rope), tokens, progress=False)
        programs[f"merge_kv_heads.{rope}"] = canonical_program(captured, plan)
    return programs
