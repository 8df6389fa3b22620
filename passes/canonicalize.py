"""Canonicalize: one GQA-native `kvcompile::attention` per site.

HF attention repeats K/V heads for GQA (unsqueeze/expand/reshape with literal head counts) before
SDPA. Those literals break as soon as a pass changes a head count or head dim, so this pass runs
first: SDPA(q, repeat(cat_k), repeat(cat_v)) becomes attention(q, cat_k, cat_v) and the repeat ops
die. The op keeps SDPA's mask, scale and causal flag exactly. A reshape of the attention output to
its own shape (HF writes one, with the head dim as a literal) goes too, for the same reason.
"""

from __future__ import annotations

import torch
import torch.fx

from kvcompile.plan import Plan

from .graph import replace_with_call
from .sites import SDPA, find_attention_sites


def canonicalize_attention(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    graph = gm.graph
    for site in find_attention_sites(gm):
        if site.attention.target != SDPA:
            continue
        canonical = replace_with_call(gm, site.attention, torch.ops.kvcompile.attention.default, (
            site.query, site.key_cat, site.value_cat, site.mask, site.scale, site.is_causal,
        ))  # fmt: skip
        for user in list(canonical.users):
            if _is_identity_reshape(user):
                user.replace_all_uses_with(canonical)
                graph.erase_node(user)
    graph.eliminate_dead_code()
    return gm


def _is_identity_reshape(node: torch.fx.Node) -> bool:
    if node.target not in (torch.ops.aten.reshape.default, torch.ops.aten.view.default):
        return False
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    # symbolic sizes print as their symbols (s0, s1, ...): equal text, equal shape
    return before is not None and after is not None and str(list(before.shape)) == str(list(after.shape))
