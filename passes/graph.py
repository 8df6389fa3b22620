"""What the passes share: their error, the canonical-sites precondition, adding a constant or an
input, replacing a node by an op call, gathering a key's kept channels."""

from __future__ import annotations

import torch
import torch.fx

from kvcompile.program import placeholder_name, signature_of

from .sites import AttentionSite


class PassError(RuntimeError):
    """A program a pass cannot rewrite; the message names the layer and what is in the way."""


def require_canonical(site: AttentionSite, pass_name: str) -> None:
    """Passes that rewrite attention run after `canonicalize_attention` (one op per site)."""
    if site.attention.target != torch.ops.kvcompile.attention.default:
        raise PassError(f"layer {site.layer}: {pass_name} needs canonical sites; run canonicalize_attention first")


def add_constant(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor) -> torch.fx.Node:
    """`tensor` as buffer `name` of the program, read by a get_attr ahead of all computation."""
    gm.register_buffer(name, tensor.contiguous())
    graph = gm.graph
    with graph.inserting_before(next(node for node in graph.nodes if node.op != "placeholder")):
        return graph.get_attr(name)


def replace_with_call(gm: torch.fx.GraphModule, node: torch.fx.Node, op, args: tuple) -> torch.fx.Node:
    """Replace `node` by `op(*args)` at its place: same metadata, same users."""
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(op, args)
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def gather_kept_channels(graph: torch.fx.Graph, key: torch.fx.Node, indices) -> list[torch.fx.Node]:
    """One `gather_kv_channels(key, heads, channels)` per width group, at the graph's insert point."""
    return [
        graph.call_function(torch.ops.kvcompile.gather_kv_channels.default, (key, heads, channels))
        for heads, channels in indices
    ]


def add_input(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """A new last program input `name` (its signature too), or the existing one."""
    sig = signature_of(gm)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    existing = next((node for node in placeholders if node.target == placeholder_name(name)), None)
    if existing is not None:
        return existing
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(placeholder_name(name))
    sig.inputs.append(name)
    return node


def eliminate_dead_code(gm: torch.fx.GraphModule) -> None:
    """FX's dead-code elimination, keeping in-place method calls: FX counts every call_method as pure,
    but a dynamo graph writes state that way (a cache's `counter.add_(n)`)."""
    gm.graph.eliminate_dead_code(
        is_impure_node=lambda node: node.is_impure() or (node.op == "call_method" and node.target.endswith("_"))
    )
