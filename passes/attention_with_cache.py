"""Fuse each attention site's cache update into the attention: `kvcompile::attention_with_cache`.

For the ONNX export's GroupQueryAttention option: onnxruntime's op takes the past and the new
K/V and returns the present cache itself, so the site's two concats and its attention become one
node with three results (output, present K, present V). Only plain sites qualify: canonical
`kvcompile::attention` over `cat([past, new], -2)` of a cache input, as left by no plan or by
weight-folded head merges. The site's mask is dropped for the op's own causal rule, which is the
same for unpadded batches (the runtime refuses padding), but not for a sliding-window layer's: such
a site is refused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from kvcompile.plan import Plan
from kvcompile.program import model_shape_of

from .graph import PassError, require_canonical
from .sites import find_attention_sites


def fuse_cache_update(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    graph = gm.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    shape = model_shape_of(gm)
    for site in find_attention_sites(gm):
        require_canonical(site, "fuse_cache_update")
        if shape.window(site.layer) is not None:
            raise PassError(f"layer {site.layer}: it attends a sliding window of {shape.window(site.layer)} tokens, "
                            "which the fused cache update's causal rule would drop: export with gqa=False")
        if site.past_key.op != "placeholder" or site.past_value.op != "placeholder":
            raise PassError(f"layer {site.layer}: the cache concat does not read the cache inputs directly")
        last_input = max(site.key_cat, site.value_cat, site.query, key=order.__getitem__)
        with graph.inserting_after(last_input):
            fused = graph.call_function(torch.ops.kvcompile.attention_with_cache.default, (
                site.query, site.past_key, site.past_value, site.new_key, site.new_value, site.scale,
            ))  # fmt: skip
        with graph.inserting_after(fused):
            present_value = graph.call_function(operator.getitem, (fused, 2))
            present_key = graph.call_function(operator.getitem, (fused, 1))
            output = graph.call_function(operator.getitem, (fused, 0))
        site.attention.replace_all_uses_with(output)
        graph.erase_node(site.attention)
        site.key_cat.replace_all_uses_with(present_key)
        site.value_cat.replace_all_uses_with(present_value)
        graph.erase_node(site.key_cat)
        graph.erase_node(site.value_cat)
    graph.eliminate_dead_code()
    return gm
