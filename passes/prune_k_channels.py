"""Prune K channels (LeanK): the cache keeps only each KV head's planned post-RoPE key channels.

Runs on canonical sites (`kvcompile::attention`). One program per phase, since LeanK attends
densely while prefilling and with the kept channels once tokens come from the cache:

- ``prefill``: attention unchanged; the present K of a planned layer leaves the program as one
  tensor per width group, `gather_kv_channels(cat_k)`, instead of the full-width key.
- ``decode``: the past K arrives as width groups; the new key is gathered the same way and
  appended per group; `pruned_attention` scores `q[idx] . k[idx]` with the original scale.
  The query is gathered inside the op, per KV head's channels, for every head of its GQA group.

Layers the plan leaves out are untouched.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx

from kvcompile.cache import KGroup, k_groups, key_entry
from kvcompile.capture import past, placeholder_name, present, signature_of
from kvcompile.plan import Plan

from .sites import AttentionSite, find_attention_sites

aten = torch.ops.aten
Phase = Literal["prefill", "decode"]


class PassError(RuntimeError):
    pass


def prune_k_channels(gm: torch.fx.GraphModule, plan: Plan, phase: Phase) -> torch.fx.GraphModule:
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    for site in find_attention_sites(gm):
        if site.layer not in plan.k_channels:
            continue
        if site.attention.target != torch.ops.kvcompile.attention.default:
            raise PassError(f"layer {site.layer}: prune_k_channels needs canonical sites; run canonicalize_attention first")
        groups = k_groups(plan, site.layer)
        indices = [_index_constants(gm, site.layer, group) for group in groups]
        if phase == "prefill":
            present_keys = _gather_groups(gm, site.key_cat, indices)
        else:
            present_keys = _decode_from_groups(gm, site, groups, indices)
        names = [present(key_entry(site.layer, group.width)) for group in groups]
        _replace_output(gm, present(key_entry(site.layer)), present_keys, names)
        if phase == "decode":  # the full-width key and its cache input are gone
            gm.graph.erase_node(site.key_cat)
            gm.graph.erase_node(site.past_key)
    gm.graph.eliminate_dead_code()
    return gm


def _index_constants(gm, layer: int, group: KGroup) -> tuple[torch.fx.Node, torch.fx.Node]:
    device = next(gm.parameters()).device
    nodes = []
    for kind, tensor in (("heads", group.heads_tensor()), ("channels", group.channels_tensor())):
        name = f"k_{kind}_{layer}_w{group.width}"
        gm.register_buffer(name, tensor.to(device))
        with gm.graph.inserting_before(_first_compute_node(gm.graph)):
            nodes.append(gm.graph.get_attr(name))
    return nodes[0], nodes[1]


def _first_compute_node(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in graph.nodes if n.op != "placeholder")


def _gather_groups(gm, key: torch.fx.Node, indices) -> list[torch.fx.Node]:
    with gm.graph.inserting_after(key):
        return [
            gm.graph.call_function(torch.ops.kvcompile.gather_kv_channels.default, (key, heads, channels))
            for heads, channels in reversed(indices)
        ][::-1]


def _decode_from_groups(gm, site: AttentionSite, groups, indices) -> list[torch.fx.Node]:
    graph, sig = gm.graph, signature_of(gm)
    past_name = past(key_entry(site.layer))
    group_names = [past(key_entry(site.layer, g.width)) for g in groups]
    with graph.inserting_before(site.past_key):
        past_groups = [graph.placeholder(placeholder_name(name)) for name in group_names]
    position = sig.inputs.index(past_name)
    sig.inputs[position : position + 1] = group_names

    with graph.inserting_before(site.attention):
        new_groups = [
            graph.call_function(torch.ops.kvcompile.gather_kv_channels.default, (site.new_key, heads, channels))
            for heads, channels in indices
        ]
        present_groups = [
            graph.call_function(aten.cat.default, ([old, new], -2)) for old, new in zip(past_groups, new_groups)
        ]
        pruned = graph.call_function(
            torch.ops.kvcompile.pruned_attention.default,
            (
                site.query,
                present_groups,
                [heads for heads, _ in indices],
                [channels for _, channels in indices],
                site.value_cat,
                site.mask,
                site.scale,
                site.is_causal,
            ),
        )
    pruned.meta.update(site.attention.meta)
    site.attention.replace_all_uses_with(pruned)
    graph.erase_node(site.attention)

    # Sizes read off the old full-width past key (batch, past length) are the past value's too.
    for user in list(site.past_key.users):
        if user is site.key_cat:
            continue
        if user.target == aten.sym_size.int and user.args[1] in (0, 2):
            user.replace_input_with(site.past_key, site.past_value)
        else:
            raise PassError(f"layer {site.layer}: the past key is used by {user.format_node()}, which cannot be rewritten")
    return present_groups


def _replace_output(gm, name: str, nodes: list[torch.fx.Node], names: list[str]) -> None:
    sig = signature_of(gm)
    output = gm.graph.output_node()
    values = list(output.args[0])
    position = sig.outputs.index(name)
    old = values[position]
    values[position : position + 1] = nodes
    sig.outputs[position : position + 1] = names
    output.args = (tuple(values),)
