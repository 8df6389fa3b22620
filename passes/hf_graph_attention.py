"""Plan attention in a graph dynamo captured from a Hugging Face forward on HF's own cache.

A model given a `kvcompile.StaticCompressedCache` has its sites lowered by cache_sites.py first;
this pass serves the calls that bring no cache, so transformers makes a DynamicCache in the
forward. Such a graph is torch-level and carries the cache object's update inline:

    keys = torch.cat([past_keys, key_states], dim=-2)          # DynamicLayer.update
    out  = F.scaled_dot_product_attention(q, keys, values, ...)  # maybe through repeat_kv

`past_keys` is a graph input when the call got a filled cache (a decode call) and an empty
constant when the call created its cache (a prefill). Decode sites get the plan's attention:
every key, past and new, is gathered to its KV head's kept channels and `kvcompile::pruned_attention`
scores with them, the op and layout of `prune_k_channels_decode`'s program. Prefill attention stays
dense, as LeanK prefills.

HF's cache keeps the model's layout (full-width keys of every head), so on it this pass changes what
attention computes, never what the cache holds: the plan's outputs without its memory. That rules
out plans that merge heads or keep windows, which need the compressed cache, and plans that update
projections, whose factors the compressed cache carries (cache_site_updates.py).

The plan is checked by `Plan.validate` against the shape the graph shows (layers, heads, head dim);
the graph does not say which model type it came from.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from kvcompile.layout import k_groups
from kvcompile.plan import ModelShape, Plan, PlanError

from .graph import eliminate_dead_code, gather_kept_channels, replace_with_call
from .sites import attention_arguments, walk_back

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
# HF's repeat_kv: x[:, :, None, :, :].expand(...).reshape(...)
_REPEAT_METHODS = {"expand", "reshape", "view", "contiguous"}
# dynamo names a graph input by where it came from: ...past_key_values.layers[3].keys
_CACHE_KEYS_SOURCE = re.compile(r"\.layers\[(\d+)\]\.keys$")


@dataclass
class DecodeSite:
    layer: int
    attention: torch.fx.Node
    arguments: dict  # the attention call's, by SDPA's parameter names
    key_cat: torch.fx.Node
    value_cat: torch.fx.Node


def plan_attention_in_hf_graph(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    if not any(node.op == "call_function" and node.target in _SDPA for node in gm.graph.nodes):
        return gm  # no attention on HF's cache (none at all, or every site was a StaticCompressedCache's)
    check_plan_for_hf_graphs(plan)
    sites = find_decode_sites(gm)
    if sites:
        plan.validate(_shape_seen(sites))
    for site in sites:
        if site.layer in plan.k_channels:
            _attend_with_kept_channels(gm, site, plan)
    eliminate_dead_code(gm)
    return gm


def check_plan_for_hf_graphs(plan: Plan) -> None:
    """Refuse, by field, what the model's own cache object cannot hold."""
    if plan.merges:
        raise PlanError(
            f"field merges: the plan merges KV heads of layers {sorted(plan.merges)}, which transformers' own cache "
            "cannot hold: pass past_key_values=kvcompile.cache_for(model, plan, batch_size=..., max_cache_len=...)"
        )
    if plan.windowed:
        raise PlanError(
            f"fields sink={plan.sink}, recent={plan.recent}: windowed plans need the cache regions of "
            "kvcompile.transform(model, plan); the torch.compile backend takes plans without windows"
        )
    if plan.updates:
        raise PlanError(
            f"field updates: the plan updates the attention projections of layers {sorted(plan.updates)} (a healed "
            "plan), whose factors ride on the compressed cache: pass past_key_values=kvcompile.cache_for(model, plan, "
            "batch_size=..., max_cache_len=...)"
        )


def find_decode_sites(gm: torch.fx.GraphModule) -> list[DecodeSite]:
    """The attention calls that read a cache passed in, ordered by layer."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        arguments = attention_arguments(node)
        key_cat = walk_back(arguments["key"], _is_repeat_kv, _is_cache_cat)
        value_cat = walk_back(arguments["value"], _is_repeat_kv, _is_cache_cat)
        if key_cat is None or value_cat is None:
            raise PlanError(
                f"{node.format_node()}: its key/value do not come from a cache concat cat([past, new], -2); "
                "kvcompile matches the attention of transformers models with a DynamicCache"
            )
        past_keys = key_cat.args[0][0]
        if past_keys.op != "placeholder":
            continue  # the cache was created in this call: a prefill, attended densely
        sites.append(DecodeSite(_layer_of(past_keys), node, arguments, key_cat, value_cat))
    sites.sort(key=lambda site: site.layer)
    return sites


def _is_repeat_kv(node: torch.fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _REPEAT_METHODS) or (
        node.op == "call_function" and node.target is operator.getitem
    )


def _is_cache_cat(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return len(node.args[0]) == 2 and dim in (-2, 2)


def _layer_of(past_keys: torch.fx.Node) -> int:
    grapharg = past_keys.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None else past_keys.target
    match = _CACHE_KEYS_SOURCE.search(source)
    if match is None:
        raise PlanError(f"graph input {source}: expected the keys of a transformers cache layer (…layers[i].keys)")
    return int(match.group(1))


def _shape_seen(sites: list[DecodeSite]) -> ModelShape:
    """The model shape the graph shows, for `Plan.validate`; every layer's cache must be in it."""
    layers = {site.layer for site in sites}
    if layers != set(range(len(layers))):
        raise PlanError(
            f"this graph attends over cache layers {sorted(layers)}, not all of them: the forward was split "
            "(a graph break); torch.compile(..., fullgraph=True) shows where"
        )
    _, num_kv_heads, _, head_dim = sites[0].key_cat.meta["example_value"].shape
    num_heads = sites[0].arguments["query"].meta["example_value"].shape[1]
    return ModelShape(model_type=None, num_layers=len(layers), num_kv_heads=num_kv_heads, num_heads=num_heads,
                      head_dim=head_dim)


def _attend_with_kept_channels(gm: torch.fx.GraphModule, site: DecodeSite, plan: Plan) -> None:
    arguments, graph = site.arguments, gm.graph
    if arguments["dropout_p"] != 0.0:
        raise PlanError(f"layer {site.layer}: attention with dropout (is the model in training mode?)")
    query = arguments["query"]
    device = query.meta["example_value"].device
    scale = arguments["scale"] if arguments["scale"] is not None else query.meta["example_value"].shape[-1] ** -0.5
    with graph.inserting_before(site.attention):
        indices = [
            (_index_tensor(graph, list(group.heads), device), _index_tensor(graph, [list(ids) for ids in group.channels], device))
            for group in k_groups(plan, site.layer)
        ]
        key_groups = gather_kept_channels(graph, site.key_cat, indices)
    replace_with_call(gm, site.attention, torch.ops.kvcompile.pruned_attention.default, (
        query,
        key_groups,
        [heads for heads, _ in indices],
        [channels for _, channels in indices],
        site.value_cat,
        arguments["attn_mask"],
        float(scale),
        bool(arguments["is_causal"]),
    ))  # fmt: skip


def _index_tensor(graph: torch.fx.Graph, values, device: torch.device) -> torch.fx.Node:
    # built in the graph, as dynamo writes `torch.tensor([...])`: AOTAutograd takes a dynamo graph's
    # buffers for the model's and traces with fake tensors, so a real tensor attribute would not do
    return graph.call_function(torch.tensor, (values,), {"dtype": torch.int64, "device": device})
