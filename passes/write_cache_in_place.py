"""Write the cache in place: a decode program whose cache inputs are buffers with capacity.

A decode program from `prune_k_channels_decode` (or the canonical one) extends each cache entry it
writes by concatenation and returns the result:

    present_X = cat([past_X, new], -2)       attention reads present_X        output present_X

so every call copies every token held. Here each entry's input is a buffer (B, H, capacity, w)
holding each row's tokens in slots [0, count), and the program instead writes this call's tokens
into it and attends over it up to each row's count:

    write_cache(past_X, new, slots)          attention reads past_X, lengths   (no output)

`slots` and the counts are program inputs (program.py): `cache_slots`/`cache_lengths` for entries
holding every token, `window_slots`/`window_lengths` for the full-channel windows, and
`middle_lengths` for the pruned middle, which decode reads but never writes. Attention then needs
no mask: the counts say which slots hold tokens and the new tokens are each row's last. The mask
HF built from positions dies with its last user.

A sliding-window layer's entries are rings (layout.py): its tokens go to slots cache_slots % C, C
the entry's capacity, and its attention reads the rings with `window`, the layer's sliding window.
"""

from __future__ import annotations

import torch
import torch.fx

from kvcompile.layout import entry_kind, entry_layer
from kvcompile.plan import Plan
from kvcompile.program import (
    CACHE_LENGTHS,
    CACHE_SLOTS,
    MIDDLE_LENGTHS,
    WINDOW_LENGTHS,
    WINDOW_SLOTS,
    past,
    model_shape_of,
    placeholder_name,
    signature_of,
)

from .graph import PassError, add_input

aten = torch.ops.aten
ops = torch.ops.kvcompile
_WINDOW_KINDS = ("key_window", "value_window")
# where each attention op takes its mask and causal flag (positional), and which counts it reads
_MASK_AND_CAUSAL = {
    ops.attention.default: (3, 5),
    ops.pruned_attention.default: (5, 7),
    ops.windowed_attention.default: (7, 9),
}
_VALUES = {ops.attention.default: 2, ops.pruned_attention.default: 4}  # the value cache, which names the layer


def write_cache_in_place(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    graph, sig, shape = gm.graph, signature_of(gm), model_shape_of(gm)
    output = graph.output_node()
    placeholders = {node.target: node for node in graph.nodes if node.op == "placeholder"}
    kept, kept_names, written = [], [], []
    for name, node in zip(sig.outputs, output.args[0]):
        entry = name.removeprefix("present_")
        if entry == name:  # not a cache entry (the logits)
            kept.append(node)
            kept_names.append(name)
            continue
        buffer = placeholders.get(placeholder_name(past(entry)))
        if not _is_append(node, buffer):
            raise PassError(f"cache entry {entry}: its present value is {node.format_node()}, not cat([past, new], -2) "
                            "of its past input")
        written.append((entry, node, buffer))
    output.args = (tuple(kept),)
    sig.outputs = kept_names

    for entry, append, buffer in written:
        slots = add_input(gm, WINDOW_SLOTS if entry_kind(entry) in _WINDOW_KINDS else CACHE_SLOTS)
        with graph.inserting_before(append):
            if shape.window(entry_layer(entry)) is not None:
                capacity = graph.call_function(aten.sym_size.int, (buffer, 2))
                slots = graph.call_function(aten.remainder.Scalar, (slots, capacity))
            graph.call_function(ops.write_cache.default, (buffer, append.args[0][1], slots))
        append.replace_all_uses_with(buffer)
        graph.erase_node(append)

    layer_of = {placeholder_name(past(entry)): entry_layer(entry) for entry in sig.cache_inputs}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _MASK_AND_CAUSAL:
            _attend_by_counts(gm, node)
            if node.target in _VALUES:
                window = shape.window(layer_of[node.args[_VALUES[node.target]].target])
                if window is not None:
                    node.update_kwarg("window", window)
    graph.eliminate_dead_code()
    return gm


def _is_append(node: torch.fx.Node, buffer: torch.fx.Node | None) -> bool:
    if buffer is None or node.target != aten.cat.default or len(node.args[0]) != 2 or node.args[0][0] is not buffer:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (-2, 2)


def _attend_by_counts(gm: torch.fx.GraphModule, attention: torch.fx.Node) -> None:
    mask, causal = _MASK_AND_CAUSAL[attention.target]
    attention.update_arg(mask, None)
    attention.update_arg(causal, False)
    if attention.target == ops.windowed_attention.default:
        attention.update_kwarg("window_lengths", add_input(gm, WINDOW_LENGTHS))
        attention.update_kwarg("middle_lengths", add_input(gm, MIDDLE_LENGTHS))
    else:
        attention.update_kwarg("lengths", add_input(gm, CACHE_LENGTHS))
