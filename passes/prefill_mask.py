"""Prefill attention takes its mask from the program: input `prefill_mask` (B, 1, S, S), bool.

The mask HF builds inside a captured prefill comes from positions alone (causal, every token
real). A padded batch needs its padding in the mask, and only the caller knows it (the attention
mask a transformers user passes), so every canonical site attends with the program input instead,
`is_causal` cleared; what HF built for the mask dies with its last user.

A sliding-window layer (window W) attends with that mask and its window, over the program's
positions (counted over real tokens): query at position p sees keys at positions > p - W. One mask
per distinct window, built once.
"""

from __future__ import annotations

import torch
import torch.fx

from kvcompile.plan import Plan
from kvcompile.program import PREFILL_MASK, model_shape_of, placeholder_name

from .graph import add_input, require_canonical
from .sites import find_attention_sites

aten = torch.ops.aten
_MASK, _IS_CAUSAL = 3, 5  # kvcompile::attention(q, k, v, mask, scale, is_causal)


def attend_with_prefill_mask(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    sites = find_attention_sites(gm)
    for site in sites:
        require_canonical(site, "attend_with_prefill_mask")
    mask = add_input(gm, PREFILL_MASK)
    shape = model_shape_of(gm)
    sliding: dict[int, torch.fx.Node] = {}
    for site in sites:
        window = shape.window(site.layer)
        if window is not None and window not in sliding:
            sliding[window] = _sliding_mask(gm, mask, window)
        site.attention.update_arg(_MASK, mask if window is None else sliding[window])
        site.attention.update_arg(_IS_CAUSAL, False)
    gm.graph.eliminate_dead_code()
    return gm


def _sliding_mask(gm: torch.fx.GraphModule, mask: torch.fx.Node, window: int) -> torch.fx.Node:
    """`mask` and (query position - key position < window), (B, 1, S, S), right after the inputs."""
    graph = gm.graph
    positions = next(n for n in graph.nodes if n.op == "placeholder" and n.target == placeholder_name("position_ids"))
    call = lambda op, *args: graph.call_function(op, args)
    with graph.inserting_before(mask.next):  # the program's last input
        query, key = call(aten.unsqueeze.default, positions, 2), call(aten.unsqueeze.default, positions, 1)
        distance = call(aten.sub.Tensor, query, key)
        near = call(aten.unsqueeze.default, call(aten.lt.Scalar, distance, window), 1)
        return call(aten.logical_and.default, mask, near)
