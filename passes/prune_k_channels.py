"""Prune K channels (LeanK): the cache keeps only each KV head's planned post-RoPE key channels.

Runs on canonical sites (`kvcompile::attention`). One pass per phase, since LeanK attends
densely while prefilling and with the kept channels once tokens come from the cache:

- `prune_k_channels_prefill`: attention unchanged; the present K of a planned layer leaves the program as one
  tensor per width group, `gather_kv_channels(cat_k)`, instead of the full-width key.
- `prune_k_channels_decode`: the past K arrives as width groups; the new key is gathered the same way and
  appended per group; `pruned_attention` scores `q[idx] . k[idx]` with the original scale.
  The query is gathered inside the op, per KV head's channels, for every head of its GQA group.

With windows (`plan.windowed`, layout in cache.py) the programs work on the window only:

- prefill: attention unchanged; the present K/V leave whole as the window
  (`key_window.{l}`, `value_window.{l}`).
- decode: the new key and value are appended to the window; the middle (K width groups, V of
  the non-streaming heads) is read, not written; `windowed_attention` attends over both.

The runtime then moves tokens from the window to the middle (`cache.flush_windows`).

Layers the plan leaves out are untouched.
"""

from __future__ import annotations

import operator
from typing import Literal

import torch
import torch.fx

from kvcompile.layout import KGroup, k_groups, key_entry, key_window_entry, value_entry, value_window_entry
from kvcompile.plan import Plan
from kvcompile.program import past, placeholder_name, present, signature_of

from .graph import PassError, add_constant, gather_kept_channels, replace_with_call, require_canonical
from .sites import AttentionSite, find_attention_sites

aten = torch.ops.aten
Phase = Literal["prefill", "decode"]


def prune_k_channels_prefill(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """The prefill program: dense attention, the cache written in the plan's layout."""
    return _prune(gm, plan, "prefill")


def prune_k_channels_decode(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """The decode program: the plan's layout read and extended, attention on the kept channels."""
    return _prune(gm, plan, "decode")


def _prune(gm: torch.fx.GraphModule, plan: Plan, phase: Phase) -> torch.fx.GraphModule:
    for site in find_attention_sites(gm):
        if site.layer not in plan.k_channels:
            continue
        require_canonical(site, f"prune_k_channels_{phase}")
        if plan.windowed:
            _windowed(gm, site, plan, phase)
            continue
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
    return (
        add_constant(gm, f"k_heads_{layer}_w{group.width}", group.heads_tensor().to(device)),
        add_constant(gm, f"k_channels_{layer}_w{group.width}", group.channels_tensor().to(device)),
    )


def _gather_groups(gm, key: torch.fx.Node, indices) -> list[torch.fx.Node]:
    # each insertion lands right after `key`: create the last group first to keep the groups in order
    with gm.graph.inserting_after(key):
        return gather_kept_channels(gm.graph, key, indices[::-1])[::-1]


def _decode_from_groups(gm, site: AttentionSite, groups, indices) -> list[torch.fx.Node]:
    graph = gm.graph
    past_groups = _split_input(gm, site.past_key, key_entry(site.layer), [key_entry(site.layer, g.width) for g in groups])

    with graph.inserting_before(site.attention):
        new_groups = gather_kept_channels(graph, site.new_key, indices)
        present_groups = [
            graph.call_function(aten.cat.default, ([old, new], -2)) for old, new in zip(past_groups, new_groups)
        ]
    replace_with_call(gm, site.attention, torch.ops.kvcompile.pruned_attention.default, (
        site.query,
        present_groups,
        [heads for heads, _ in indices],
        [channels for _, channels in indices],
        site.value_cat,
        site.mask,
        site.scale,
        site.is_causal,
    ))

    # Sizes read off the old full-width past key (batch, past length) are the past value's too.
    for user in list(site.past_key.users):
        if user is site.key_cat:
            continue
        if user.target == aten.sym_size.int and user.args[1] in (0, 2):
            user.replace_input_with(site.past_key, site.past_value)
        else:
            raise PassError(f"layer {site.layer}: the past key is used by {user.format_node()}, which cannot be rewritten")
    return present_groups


def _windowed(gm, site: AttentionSite, plan: Plan, phase: Phase) -> None:
    """The site for the windowed layout: its present K/V leave as the window."""
    if phase == "decode":
        _attend_over_window_and_middle(gm, site, plan)
    _replace_output(gm, present(key_entry(site.layer)), [site.key_cat], [present(key_window_entry(site.layer))])
    _replace_output(gm, present(value_entry(site.layer)), [site.value_cat], [present(value_window_entry(site.layer))])


def _attend_over_window_and_middle(gm, site: AttentionSite, plan: Plan) -> None:
    """Inputs: the window (full K/V) and the middle (K width groups, V of non-streaming heads);
    the new tokens join the window; `windowed_attention` attends over both regions."""
    graph, sig, layer = gm.graph, signature_of(gm), site.layer
    groups = k_groups(plan, layer)
    indices = [_index_constants(gm, layer, group) for group in groups]
    key_window, *middle_keys = _split_input(
        gm, site.past_key, key_entry(layer), [key_window_entry(layer)] + [key_entry(layer, g.width) for g in groups]
    )
    # the past value input stays, now holding the middle V (same entry name); the window comes before it
    middle_values = site.past_value
    with graph.inserting_before(middle_values):
        value_window = graph.placeholder(placeholder_name(past(value_window_entry(layer))))
    sig.inputs.insert(sig.inputs.index(past(value_entry(layer))), past(value_window_entry(layer)))

    _read_sizes_from_both_regions(gm, site, value_window, middle_values)
    site.key_cat.replace_input_with(site.past_key, key_window)
    site.value_cat.replace_input_with(middle_values, value_window)
    graph.erase_node(site.past_key)
    replace_with_call(gm, site.attention, torch.ops.kvcompile.windowed_attention.default, (
        site.query,
        site.key_cat,
        site.value_cat,
        middle_keys,
        [heads for heads, _ in indices],
        [channels for _, channels in indices],
        middle_values,
        site.mask,
        site.scale,
        site.is_causal,
        plan.sink,
    ))


def _split_input(gm, old: torch.fx.Node, old_entry: str, entries: list[str]) -> list[torch.fx.Node]:
    """New inputs for cache `entries` where the input of `old_entry` was (`old` is not erased)."""
    sig = signature_of(gm)
    names = [past(entry) for entry in entries]
    with gm.graph.inserting_before(old):
        nodes = [gm.graph.placeholder(placeholder_name(name)) for name in names]
    position = sig.inputs.index(past(old_entry))
    sig.inputs[position : position + 1] = names
    return nodes


def _read_sizes_from_both_regions(gm, site: AttentionSite, window, middle) -> None:
    """Sizes read off the full past K/V inputs: the batch is the window's, the past length is
    window + middle (the mask HF builds from it covers the whole sequence)."""
    graph = gm.graph
    size_users = [u for old in (site.past_key, site.past_value) for u in old.users if u not in (site.key_cat, site.value_cat)]
    for user in size_users:
        if user.target != aten.sym_size.int or user.args[1] not in (0, 2):
            raise PassError(f"layer {site.layer}: the past key/value is used by {user.format_node()}, which cannot be rewritten")
        if user.args[1] == 0:
            user.replace_input_with(user.args[0], window)
            continue
        with graph.inserting_before(user):
            length = graph.call_function(
                operator.add,
                (graph.call_function(aten.sym_size.int, (window, 2)), graph.call_function(aten.sym_size.int, (middle, 2))),
            )
        user.replace_all_uses_with(length)
        graph.erase_node(user)


def _replace_output(gm, name: str, nodes: list[torch.fx.Node], names: list[str]) -> None:
    sig = signature_of(gm)
    output = gm.graph.output_node()
    values = list(output.args[0])
    position = sig.outputs.index(name)
    values[position : position + 1] = nodes
    sig.outputs[position : position + 1] = names
    output.args = (tuple(values),)
