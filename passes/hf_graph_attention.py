"""Plan attention in a graph dynamo captured from a Hugging Face forward (the torch.compile backend).

Such a graph is torch-level and carries the HF cache object's update inline:

    keys = torch.cat([past_keys, key_states], dim=-2)          # DynamicLayer.update
    out  = F.scaled_dot_product_attention(q, keys, values, ...)  # maybe through repeat_kv

`past_keys` is a graph input when the call got a filled cache (a decode call) and an empty
constant when the call created its cache (a prefill). Decode sites get the plan's attention:
every key, past and new, is gathered to its KV head's kept channels and `kvcompile::pruned_attention`
scores with them, the op and layout of `prune_k_channels`' decode program. Prefill attention stays
dense, as LeanK prefills.

HF's cache code concatenates full-width keys of the model's head count, and dynamo re-traces that
code on every new cache shape, so the cache object must keep the model's layout: this pass changes
what attention computes, never what the cache holds (the compressed cache is `kvcompile.transform`'s).
That also rules out plans that merge heads or keep windows.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from kvcompile.cache import k_groups
from kvcompile.plan import Plan, PlanError

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
# HF's repeat_kv: x[:, :, None, :, :].expand(...).reshape(...)
_REPEAT_METHODS = {"expand", "reshape", "view", "contiguous"}
# dynamo names a graph input by where it came from: ...past_key_values.layers[3].keys
_CACHE_KEYS_SOURCE = re.compile(r"\.layers\[(\d+)\]\.keys$")


@dataclass
class DecodeSite:
    layer: int
    attention: torch.fx.Node
    query: torch.fx.Node
    key_cat: torch.fx.Node
    value_cat: torch.fx.Node


def plan_attention_in_hf_graph(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    check_plan_for_hf_graphs(plan)
    sites = find_decode_sites(gm)
    _check_plan_fits(plan, sites)
    for site in sites:
        if site.layer in plan.k_channels:
            _attend_with_kept_channels(gm, site, plan)
    gm.graph.eliminate_dead_code()
    return gm


def check_plan_for_hf_graphs(plan: Plan) -> None:
    """Refuse, by field, what the model's own cache object cannot hold."""
    if plan.merges:
        raise PlanError(
            f"field merges: the plan merges KV heads of layers {sorted(plan.merges)}; under torch.compile the "
            "model's own cache keeps every KV head. Use kvcompile.transform(model, plan) for merged plans"
        )
    if plan.windowed:
        raise PlanError(
            f"fields sink={plan.sink}, recent={plan.recent}: windowed plans need the cache regions of "
            "kvcompile.transform(model, plan); the torch.compile backend takes plans without windows"
        )


def find_decode_sites(gm: torch.fx.GraphModule) -> list[DecodeSite]:
    """The attention calls that read a cache passed in, ordered by layer."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        key_cat = _cache_cat(_argument(node, 1, "key"))
        value_cat = _cache_cat(_argument(node, 2, "value"))
        if key_cat is None or value_cat is None:
            raise PlanError(
                f"{node.format_node()}: its key/value do not come from a cache concat cat([past, new], -2); "
                "kvcompile matches the attention of transformers models with a DynamicCache"
            )
        past_keys = key_cat.args[0][0]
        if past_keys.op != "placeholder":
            continue  # the cache was created in this call: a prefill, attended densely
        sites.append(DecodeSite(_layer_of(past_keys), node, _argument(node, 0, "query"), key_cat, value_cat))
    sites.sort(key=lambda site: site.layer)
    return sites


def _argument(node: torch.fx.Node, position: int, name: str):
    return node.args[position] if len(node.args) > position else node.kwargs[name]


def _cache_cat(node) -> torch.fx.Node | None:
    """Walk back from an attention input through repeat_kv to the cache update's concat."""
    while isinstance(node, torch.fx.Node):
        if node.op == "call_function" and node.target is torch.cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return node if len(tensors) == 2 and dim in (-2, 2) else None
        if node.op == "call_method" and node.target in _REPEAT_METHODS:
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem:
            node = node.args[0]
        else:
            return None
    return None


def _layer_of(past_keys: torch.fx.Node) -> int:
    grapharg = past_keys.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None else past_keys.target
    match = _CACHE_KEYS_SOURCE.search(source)
    if match is None:
        raise PlanError(f"graph input {source}: expected the keys of a transformers cache layer (…layers[i].keys)")
    return int(match.group(1))


def _check_plan_fits(plan: Plan, sites: list[DecodeSite]) -> None:
    """The checks of `Plan.validate` that a graph can answer: heads and channels per planned layer,
    and planned layers beyond the cache's."""
    if not sites:
        return
    layers = {site.layer for site in sites}
    if layers != set(range(len(layers))):
        raise PlanError(
            f"this graph attends over cache layers {sorted(layers)}, not all of them: the forward was split "
            "(a graph break); torch.compile(..., fullgraph=True) shows where"
        )
    beyond = [layer for layer in plan.k_channels if layer not in layers]
    if beyond:
        raise PlanError(f"plan layer {beyond[0]}: the model's cache has layers 0..{len(layers) - 1}")
    for site in sites:
        if site.layer not in plan.k_channels:
            continue
        _, num_kv_heads, _, head_dim = site.key_cat.meta["example_value"].shape
        heads = plan.k_channels[site.layer]
        if len(heads) != num_kv_heads:
            raise PlanError(f"layer {site.layer}, field k_channels: plan lists {len(heads)} KV heads, "
                            f"model has {num_kv_heads}")
        for head, ids in enumerate(heads):
            if ids and ids[-1] >= head_dim:
                raise PlanError(f"layer {site.layer}, KV head {head}, field k_channels: channel {ids[-1]} "
                                f"out of range [0, {head_dim})")


def _attend_with_kept_channels(gm: torch.fx.GraphModule, site: DecodeSite, plan: Plan) -> None:
    graph, attention = gm.graph, site.attention
    if _argument_or(attention, 4, "dropout_p", 0.0) != 0.0:
        raise PlanError(f"layer {site.layer}: attention with dropout (is the model in training mode?)")
    device = site.query.meta["example_value"].device
    scale = _argument_or(attention, 6, "scale", None)
    if scale is None:
        scale = site.query.meta["example_value"].shape[-1] ** -0.5
    heads, channels, key_groups = [], [], []
    with graph.inserting_before(attention):
        for group in k_groups(plan, site.layer):
            heads.append(_index_tensor(graph, list(group.heads), device))
            channels.append(_index_tensor(graph, [list(ids) for ids in group.channels], device))
            key_groups.append(graph.call_function(
                torch.ops.kvcompile.gather_kv_channels.default, (site.key_cat, heads[-1], channels[-1])
            ))
        pruned = graph.call_function(torch.ops.kvcompile.pruned_attention.default, (
            site.query,
            key_groups,
            heads,
            channels,
            site.value_cat,
            _argument_or(attention, 3, "attn_mask", None),
            float(scale),
            bool(_argument_or(attention, 5, "is_causal", False)),
        ))
    pruned.meta.update(attention.meta)
    attention.replace_all_uses_with(pruned)
    graph.erase_node(attention)


def _argument_or(node: torch.fx.Node, position: int, name: str, default):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _index_tensor(graph: torch.fx.Graph, values, device: torch.device) -> torch.fx.Node:
    # built in the graph, as dynamo writes `torch.tensor([...])`: AOTAutograd takes a dynamo graph's
    # buffers for the model's and traces with fake tensors, so a real tensor attribute would not do
    return graph.call_function(torch.tensor, (values,), {"dtype": torch.int64, "device": device})
