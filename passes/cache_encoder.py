"""Cache encoder: the part of a prefill program that turns the dense present K/V into the cache.

When a plan leaves the model's computation alone until the cache (K-channel pruning, not head
merging), its prefill is the dense prefill followed by this encoder. Extracting it lets one dense
prefill serve many plans (evaluation compares several on the same prompts) while the encoding
stays exactly the one the compiled prefill performs.

Inputs: `dense_key.{l}` then `dense_value.{l}` per layer (B, Hkv, T, D); outputs: the prefill's
cache outputs, same names and order.
"""

from __future__ import annotations

import torch
import torch.fx

from kvcompile.program import LOGITS, SIGNATURE_KEY, Signature, placeholder_name, signature_of

from .graph import PassError
from .sites import find_attention_sites


class NotEncodable(PassError):
    pass


def extract_cache_encoder(prefill: torch.fx.GraphModule) -> torch.fx.GraphModule:
    sites = find_attention_sites(prefill)
    names = [f"dense_key.{site.layer}" for site in sites] + [f"dense_value.{site.layer}" for site in sites]
    graph = torch.fx.Graph()
    copied: dict[torch.fx.Node, torch.fx.Node] = {}
    for node, name in zip([s.key_cat for s in sites] + [s.value_cat for s in sites], names):
        copied[node] = graph.placeholder(placeholder_name(name))

    def copy(node: torch.fx.Node) -> torch.fx.Node:
        if node not in copied:
            if node.op not in ("get_attr", "call_function"):
                raise NotEncodable(f"cache output depends on {node.format_node()}, not only on the present K/V")
            copied[node] = graph.node_copy(node, copy)
        return copied[node]

    sig = signature_of(prefill)
    cache_outputs = [(name, node) for name, node in zip(sig.outputs, prefill.graph.output_node().args[0]) if name != LOGITS]
    graph.output(tuple(copy(node) for _, node in cache_outputs))
    encoder = torch.fx.GraphModule(prefill, graph)
    encoder.meta[SIGNATURE_KEY] = Signature(inputs=names, outputs=[name for name, _ in cache_outputs])
    return encoder
