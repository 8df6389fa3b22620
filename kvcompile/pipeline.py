"""The compiler's pipeline, as data: which passes make which program, in which order.

    captured ──CANONICAL──▶ canonical ──PREFILL──▶ prefill ──extract_cache_encoder──▶ cache encoder
                                      └─DECODE───▶ decode

`compile_programs` is the one place a captured program becomes a plan's programs: the runtime,
calibration (the canonical program, merged where the plan merges), the ONNX export, its latency
benchmark and the golden tests all go through it. Stages run through `PassManager`, which lints
and recompiles the graph after every pass.

Two sets of phase stages: `EXPLICIT` programs take the cache as inputs and return it extended
(`present_` outputs: the golden and pass tests' programs); `IN_PLACE` programs, the runtime's and
the ONNX export's, read their prefill mask from an input (padded batches) and write decode tokens
into the cache's buffers (program.py; the export then returns each written buffer,
`CACHE_WRITES_AS_OUTPUTS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from .passes import (
    PassManager,
    attend_with_prefill_mask,
    cache_writes_as_outputs,
    canonicalize_attention,
    extract_cache_encoder,
    find_attention_sites,
    lower_cache_sites,
    merge_kv_heads,
    plan_attention_in_hf_graph,
    prune_k_channels_decode,
    prune_k_channels_prefill,
    update_projections,
    update_projections_at_cache_sites,
    write_cache_in_place,
)
from .plan import Plan
from .program import clone_program, model_shape_of

# One GQA-native attention op per site, the plan's projection updates, then its head merges (weights
# folded or projections added).
CANONICAL = (canonicalize_attention, update_projections, merge_kv_heads)
# The cache in the plan's layout: written by the prefill (dense attention), read and extended by decode.
PREFILL = (prune_k_channels_prefill,)
DECODE = (prune_k_channels_decode,)


@dataclass(frozen=True)
class PhaseStages:
    prefill: tuple
    decode: tuple


EXPLICIT = PhaseStages(PREFILL, DECODE)
IN_PLACE = PhaseStages(PREFILL + (attend_with_prefill_mask,), DECODE + (write_cache_in_place,))
# ONNX export: the runtime's decode, its cache writes returned (onnxruntime binds them to the inputs' memory).
CACHE_WRITES_AS_OUTPUTS = (cache_writes_as_outputs,)
# The torch.compile backend, on the torch-level graphs dynamo captures from a transformers forward:
# sites on a StaticCompressedCache (the plan's projection updates, then its cache and attention),
# then attention on transformers' own cache.
HF_GRAPH = (update_projections_at_cache_sites, lower_cache_sites, plan_attention_in_hf_graph)


@dataclass
class Programs:
    """A plan's programs, all sharing the captured model's parameters."""

    canonical: torch.fx.GraphModule
    prefill: torch.fx.GraphModule
    decode: torch.fx.GraphModule
    # None when the plan merges heads or updates projections (see extract_cache_encoder) or layers slide (a dense cache
    # of a sliding layer holds its window, not the prompt the encoder reads)
    cache_encoder: torch.fx.GraphModule | None


def run_stage(stage, gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    return PassManager(stage)(gm, plan)


def canonical_program(captured: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """The CANONICAL stage on a copy of `captured`; raises SiteMatchError naming the layer first."""
    find_attention_sites(captured)
    return run_stage(CANONICAL, clone_program(captured), plan)


def compile_programs(captured: torch.fx.GraphModule, plan: Plan, stages: PhaseStages = EXPLICIT) -> Programs:
    canonical = canonical_program(captured, plan)
    prefill = run_stage(stages.prefill, clone_program(canonical), plan)
    decode = run_stage(stages.decode, clone_program(canonical), plan)
    # Without merges or updates the prefill is the dense model's up to the cache: one dense prefill can feed it.
    encodable = not (plan.merges or plan.updates or model_shape_of(captured).slides)
    encoder = extract_cache_encoder(prefill) if encodable else None
    return Programs(canonical, prefill, decode, encoder)
