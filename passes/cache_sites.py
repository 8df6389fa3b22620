"""Lower each cache site of a dynamo graph: the plan's cache writes and attention, in place of HF's.

A model running on a `kvcompile.StaticCompressedCache` hands each layer's new post-RoPE key and
value to `kvcompile::cache_site` (static_cache.py) and attends over what it returns, as over any
transformers cache:

    k, v = kvcompile::cache_site(new_k, new_v, lengths, entries, constants, layer, plan, prompt)
    out  = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), mask, ...)

Here that pair becomes what `kvcompile.transform`'s programs do at the same site:

    prompt (the cache held nothing)        decode (it holds tokens)
    write each row's real tokens to        write the new tokens at slots lengths[b] + i
      slots [0, n_b), padding after        attend over the entries up to lengths + S
    attend densely under the mask          (pruned_attention / attention with lengths)
    lengths := n                           lengths += S

with the layer's merge around it (queries projected after RoPE, new K and V merged before the
cache, the output projected back to the model's heads: the same maps `merge_kv_heads` folds or
inserts) and its kept K channels gathered before the cache. HF's mask is read at the prompt only,
for its padding (the last query's row marks every real token); decode counts come from the cache.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from kvcompile.layout import k_groups, key_entry, layer_entry_names, value_entry
from kvcompile.plan import ModelShape, Plan, PlanError

from .graph import eliminate_dead_code
from .merge_kv_heads import head_up, query_order
from .sites import attention_arguments, walk_back

ops = torch.ops.kvcompile
CACHE_SITE = (ops.cache_site, ops.cache_site.default)  # dynamo records the op as called: the packet
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_REPEAT_METHODS = {"expand", "reshape", "view", "contiguous"}  # HF's repeat_kv


@dataclass
class CacheSite:
    layer: int
    marker: torch.fx.Node  # the cache_site call
    attention: torch.fx.Node  # the SDPA over its outputs
    arguments: dict  # the attention's, by SDPA's names


_MERGE_CONSTANTS = ("groups", "key_down", "value_down", "query_order", "query_up", "output_order", "output_up")


def site_constant_names(plan: Plan, layer: int) -> list[str]:
    """The tensors a layer's lowered site reads besides its entries, in the order its cache passes
    them: kept-channel indices per width group, then a merge's maps."""
    names = []
    for group in k_groups(plan, layer) if layer in plan.k_channels else ():
        names += [f"heads.w{group.width}", f"channels.w{group.width}"]
    return names + list(_MERGE_CONSTANTS if layer in plan.merges else ())


def site_constants(plan: Plan, layer: int, shape: ModelShape, dtype: torch.dtype,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """`site_constant_names`' tensors, floating ones in `dtype`."""
    constants = {}
    for group in k_groups(plan, layer) if layer in plan.k_channels else ():
        constants[f"heads.w{group.width}"] = group.heads_tensor()
        constants[f"channels.w{group.width}"] = group.channels_tensor()
    merge = plan.merges.get(layer)
    if merge is not None:
        per_kv, d = shape.num_heads // shape.num_kv_heads, shape.head_dim
        order = query_order(merge, per_kv)
        constants.update(
            groups=torch.tensor(merge.groups, dtype=torch.int64),
            key_down=merge.key_down,
            value_down=merge.value_down,
            # new query head i is original head order[i], projected onto its merged head's channels
            query_order=torch.tensor(order, dtype=torch.int64),
            query_up=torch.stack([head_up(merge, merge.key_up, j // per_kv, d).T for j in order]),
            # and back: original head j reads new head order.index(j), mapped to its d channels
            output_order=torch.tensor(order, dtype=torch.int64).argsort(),
            output_up=torch.stack([head_up(merge, merge.value_up, j // per_kv, d) for j in range(shape.num_heads)]),
        )
    assert list(constants) == site_constant_names(plan, layer)
    return {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
            for name, t in constants.items()}


def lower_cache_sites(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    for site in find_cache_sites(gm):
        _lower(gm, site, plan)
    eliminate_dead_code(gm)
    return gm


def find_cache_sites(gm: torch.fx.GraphModule) -> list[CacheSite]:
    """Each cache_site call with the attention reading its outputs; every one must have one."""
    markers = [node for node in gm.graph.nodes if node.op == "call_function" and node.target in CACHE_SITE]
    attentions = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SDPA:
            arguments = attention_arguments(node)
            key = walk_back(arguments["key"], _is_repeat_kv, _is_site_output)
            if key is not None:
                attentions[key.args[0]] = (node, arguments)
    sites = []
    for marker in markers:
        layer = marker.args[5]
        if marker not in attentions:
            raise PlanError(
                f"layer {layer}: the keys of its StaticCompressedCache reach no scaled_dot_product_attention; "
                "kvcompile lowers the attention of transformers models loaded with attn_implementation='sdpa'"
            )
        sites.append(CacheSite(layer, marker, *attentions[marker]))
    return sorted(sites, key=lambda site: site.layer)


def _is_site_output(node: torch.fx.Node) -> bool:
    return node.target is operator.getitem and getattr(node.args[0], "target", None) in CACHE_SITE


def _is_repeat_kv(node: torch.fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _REPEAT_METHODS) or (
        node.op == "call_function" and node.target is operator.getitem
    )


def _lower(gm: torch.fx.GraphModule, site: CacheSite, plan: Plan) -> None:
    new_key, new_value, lengths, entries, constants, layer, fingerprint, prompt = site.marker.args
    if fingerprint != plan.fingerprint():
        raise PlanError(f"layer {layer}: the StaticCompressedCache was made for plan {fingerprint}, the backend was "
                        f"given plan {plan.fingerprint()}: make the cache with kvcompile.cache_for(model, plan)")
    arguments = site.arguments
    if arguments["dropout_p"] != 0.0:
        raise PlanError(f"layer {layer}: attention with dropout (is the model in training mode?)")
    query = arguments["query"]
    scale = arguments["scale"] if arguments["scale"] is not None else query.meta["example_value"].shape[-1] ** -0.5
    entry = dict(zip(layer_entry_names(plan, layer), entries, strict=True))
    constant = dict(zip(site_constant_names(plan, layer), constants, strict=True))
    device = new_key.meta["example_value"].device
    graph = site.attention.graph
    call = graph.call_function
    with graph.inserting_before(site.attention):
        if layer in plan.merges:
            query = call(ops.project_heads.default, (query, constant["query_order"], constant["query_up"]))
            new_key = call(ops.merge_heads.default, (new_key, constant["groups"], constant["key_down"]))
            new_value = call(ops.merge_heads.default, (new_value, constant["groups"], constant["value_down"]))
        groups = [(key_entry(layer, group.width), constant[f"heads.w{group.width}"], constant[f"channels.w{group.width}"])
                  for group in (k_groups(plan, layer) if layer in plan.k_channels else ())]
        new_tokens = {name: call(ops.gather_kv_channels.default, (new_key, heads, channels)) for name, heads, channels in groups}
        if not groups:
            new_tokens[key_entry(layer)] = new_key
        new_tokens[value_entry(layer)] = new_value

        if prompt:
            slots, counts = _prompt_slots(graph, arguments["attn_mask"], new_key)
        else:
            step = call(torch.arange, (call(torch.ops.aten.sym_size.int, (new_key, 2)),), {"device": device})
            slots = call(operator.add, (call(operator.getitem, (lengths, (slice(None), None))), step))
            counts = call(operator.add, (lengths, call(torch.ops.aten.sym_size.int, (new_key, 2))))
        for name, tokens in new_tokens.items():
            call(ops.write_cache.default, (entry[name], tokens, slots))

        if prompt:  # LeanK prefills densely: every channel of the prompt's own keys
            out = call(ops.attention.default, (query, new_key, new_value, arguments["attn_mask"], float(scale),
                                               bool(arguments["is_causal"])))
        elif groups:
            out = call(ops.pruned_attention.default, (
                query, [entry[name] for name, _, _ in groups], [heads for _, heads, _ in groups],
                [channels for _, _, channels in groups], entry[value_entry(layer)], None, float(scale), False, counts))
        else:
            out = call(ops.attention.default, (query, entry[key_entry(layer)], entry[value_entry(layer)], None,
                                               float(scale), False, counts))
        call(torch.ops.aten.copy_.default, (lengths, counts))
        if layer in plan.merges:
            out = call(ops.project_heads.default, (out, constant["output_order"], constant["output_up"]))
    out.meta.update(site.attention.meta)
    site.attention.replace_all_uses_with(out)
    graph.erase_node(site.attention)


def _prompt_slots(graph: torch.fx.Graph, mask: torch.fx.Node | None, new_key: torch.fx.Node):
    """(slots (B, S), counts (B,)) of a prompt: row b's real tokens in order at slots [0, n_b), its
    padding after them. Real tokens are those the last query's mask row allows (all, without a mask)."""
    call = graph.call_function
    if mask is None:
        valid = call(torch.ones_like, (call(operator.getitem, (new_key, (slice(None), 0, slice(None), 0))),),
                     {"dtype": torch.bool})
    else:
        last_row = call(operator.getitem, (mask, (slice(None), 0, -1)))
        is_bool = mask.meta["example_value"].dtype == torch.bool
        valid = last_row if is_bool else call(operator.eq, (last_row, 0))
    real_rank = call(torch.cumsum, (valid, 1))
    padding = call(torch.logical_not, (valid,))
    counts = call(torch.sum, (valid, 1))
    padding_slot = call(operator.add, (call(operator.getitem, (counts, (slice(None), None))),
                                       call(torch.cumsum, (padding, 1))))
    slots = call(torch.where, (valid, real_rank, padding_slot))
    return call(operator.sub, (slots, 1)), counts
