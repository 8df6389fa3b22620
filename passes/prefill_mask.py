"""Prefill attention takes its mask from the program: input `prefill_mask` (B, 1, S, S), bool.

The mask HF builds inside a captured prefill comes from positions alone (causal, every token
real). A padded batch needs its padding in the mask, and only the caller knows it (the attention
mask a transformers user passes), so every canonical site attends with the program input instead,
`is_causal` cleared; what HF built for the mask dies with its last user.
"""

from __future__ import annotations

import torch.fx

from kvcompile.plan import Plan
from kvcompile.program import PREFILL_MASK

from .graph import add_input, require_canonical
from .sites import find_attention_sites

_MASK, _IS_CAUSAL = 3, 5  # kvcompile::attention(q, k, v, mask, scale, is_causal)


def attend_with_prefill_mask(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    sites = find_attention_sites(gm)
    for site in sites:
        require_canonical(site, "attend_with_prefill_mask")
    mask = add_input(gm, PREFILL_MASK)
    for site in sites:
        site.attention.update_arg(_MASK, mask)
        site.attention.update_arg(_IS_CAUSAL, False)
    gm.graph.eliminate_dead_code()
    return gm
