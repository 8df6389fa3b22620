"""Lower each cache site of a dynamo graph: the plan's cache writes and attention, in place of HF's.

A model running on a `kvcompile.StaticCompressedCache` hands each layer's new post-RoPE key and
value to `kvcompile::cache_site` (static_cache.py) and attends over what it returns, as over any
transformers cache:

    k, v = kvcompile::cache_site(new_k, new_v, lengths, entries, constants, layer, plan, prompt, window)
    out  = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), mask, ...)

Here that pair becomes what `kvcompile.transform`'s programs do at the same site:

    prompt (the cache held nothing)        decode (it holds tokens)
    write each row's real tokens to        write the new tokens at slots lengths[b] + i
      slots [0, n_b), padding after        attend over the entries up to lengths + S
    attend densely under the mask          (pruned_attention / attention with lengths)
    lengths := n                           lengths += S

with the layer's merge around it (queries projected after RoPE, new K and V merged before the
cache, the output projected back to the model's heads: the same maps `merge_kv_heads` folds or
inserts) and its kept K channels gathered before the cache. A windowed layer writes each token's
kept channels to its middle as the token arrives and every channel to its window, a ring after the
sink (static_cache.py); decode attends over the middle the runtime holds before the step and the
window after it (`windowed_attention` with the ring's phase). A sliding layer's entries are rings
(static_cache.py): token t in slot t % C, a prompt's last window - 1 tokens kept, decode attending
over them with the layer's `window`. HF's mask is read at the prompt only, for its padding (its
diagonal marks every real token, under a causal or a sliding mask alike); a later call's padding
comes from the last S columns of the model's 2-D attention_mask (padding anywhere: each row's real
tokens after its own, its padding past its new count, its queries attended padding first). Decode
counts come from the cache, one per row for all layers, computed once per graph and written back
after the last site.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from kvcompile.layout import k_groups, key_entry, key_window_entry, layer_entry_names, value_entry, value_window_entry
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


def window_ring(plan: Plan) -> int:
    """Ring slots of a windowed layer's window after its sink: the most tokens it holds at a decode
    step (recent, up to buffer - 1 not yet counted in the middle, and the step's own)."""
    return plan.recent + plan.buffer


def windowed_layer(plan: Plan, layer: int) -> bool:
    """Whether `layer` keeps full-channel windows under `plan` (a planned layer of a windowed plan)."""
    return plan.windowed and layer in plan.k_channels


def site_constant_names(plan: Plan, layer: int) -> list[str]:
    """The tensors a layer's lowered site reads besides its entries, in the order its cache passes
    them: every head and channel (for entries written whole), kept-channel indices per width group,
    a windowed layer's middle value heads, a merge's maps, the factors of its projection updates
    (cache_site_updates.py)."""
    names = ["all_heads", "all_channels"]
    for group in k_groups(plan, layer) if layer in plan.k_channels else ():
        names += [f"heads.w{group.width}", f"channels.w{group.width}"]
    names += ["value_heads"] if windowed_layer(plan, layer) else []
    names += list(_MERGE_CONSTANTS if layer in plan.merges else ())
    return names + [f"update.{name}" for name in (plan.updates[layer].tensors() if layer in plan.updates else ())]


def site_constants(plan: Plan, layer: int, shape: ModelShape, dtype: torch.dtype,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """`site_constant_names`' tensors, floating ones in `dtype`."""
    heads, width = plan.kv_heads(layer, shape)
    constants = {"all_heads": torch.arange(heads), "all_channels": torch.arange(width)[None]}
    for group in k_groups(plan, layer) if layer in plan.k_channels else ():
        constants[f"heads.w{group.width}"] = group.heads_tensor()
        constants[f"channels.w{group.width}"] = group.channels_tensor()
    if windowed_layer(plan, layer):
        constants["value_heads"] = torch.tensor(plan.middle_value_heads(layer), dtype=torch.int64)
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
    if layer in plan.updates:
        constants.update({f"update.{name}": factor for name, factor in plan.updates[layer].tensors().items()})
    assert list(constants) == site_constant_names(plan, layer)
    return {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
            for name, t in constants.items()}


def lower_cache_sites(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    sites = find_cache_sites(gm)
    if not sites:
        return gm
    counts, fingerprint = _SharedCounts(gm.graph, plan), plan.fingerprint()
    for site in sites:
        _lower(site, plan, fingerprint, counts)
    counts.write_back()
    eliminate_dead_code(gm)
    return gm


def cache_site_plans(gm: torch.fx.GraphModule) -> set[str]:
    """The fingerprints of the plans whose caches the graph's cache sites read."""
    return {node.args[6] for node in gm.graph.nodes if node.op == "call_function" and node.target in CACHE_SITE}


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


def _lower(site: CacheSite, plan: Plan, fingerprint: str, shared: "_SharedCounts") -> None:
    new_key, new_value, lengths, entries, constants, layer, cache_plan, prompt, window = site.marker.args
    if cache_plan != fingerprint:
        raise PlanError(f"layer {layer}: the StaticCompressedCache was made for plan {cache_plan}, the backend was "
                        f"given plan {fingerprint}: make the cache with kvcompile.cache_for(model, plan)")
    arguments = site.arguments
    if arguments["dropout_p"] != 0.0:
        raise PlanError(f"layer {layer}: attention with dropout (is the model in training mode?)")
    query, mask = arguments["query"], arguments["attn_mask"]
    scale = float(arguments["scale"] if arguments["scale"] is not None else query.meta["example_value"].shape[-1] ** -0.5)
    entry = dict(zip(layer_entry_names(plan, layer), entries, strict=True))
    constant = dict(zip(site_constant_names(plan, layer), constants, strict=True))
    b = _Builder(site.attention.graph)
    with b.graph.inserting_before(site.attention):
        counts = shared.of(lengths, prompt, mask, new_key)
        if layer in plan.merges:
            query = b(ops.project_heads.default, query, constant["query_order"], constant["query_up"])
            new_key = b(ops.merge_heads.default, new_key, constant["groups"], constant["key_down"])
            new_value = b(ops.merge_heads.default, new_value, constant["groups"], constant["value_down"])
        groups = [(entry[key_entry(layer, group.width)], constant[f"heads.w{group.width}"],
                   constant[f"channels.w{group.width}"])
                  for group in (k_groups(plan, layer) if layer in plan.k_channels else ())]
        # (entry, source, heads, channels, slots) of each write, all made by one write_tokens call
        def whole(heads):
            return b(torch.Tensor.expand, constant["all_channels"], b(torch.ops.aten.sym_size.int, heads, 0), -1)

        every_head = constant["all_heads"]
        if windowed_layer(plan, layer):
            windows = counts.windows(entry[value_entry(layer)])
            value_heads = constant["value_heads"]
            writes = [(k, new_key, h, c, windows.middle_slot) for k, h, c in groups] + [
                (entry[value_entry(layer)], new_value, value_heads, whole(value_heads), windows.middle_slot),
                (entry[key_window_entry(layer)], new_key, every_head, whole(every_head), windows.window_slot),
                (entry[value_window_entry(layer)], new_value, every_head, whole(every_head), windows.window_slot),
            ]
        else:
            slot = _ring_slot(b, counts, entry[value_entry(layer)], window) if window else counts.index
            keys = [(k, new_key, h, c, slot) for k, h, c in groups] or [
                (entry[key_entry(layer)], new_key, every_head, whole(every_head), slot)]
            writes = keys + [(entry[value_entry(layer)], new_value, every_head, whole(every_head), slot)]
        b(ops.write_tokens.default, *(list(column) for column in zip(*writes)))

        if counts.place is not None:
            query = _tokens_at(b, query, b(torch.argsort, counts.place, 1))
        if prompt:  # LeanK prefills densely: every channel of the prompt's own keys
            out = b(ops.attention.default, query, new_key, new_value, mask, scale, bool(arguments["is_causal"]))
        elif windowed_layer(plan, layer):
            out = b(ops.windowed_attention.default, query, entry[key_window_entry(layer)],
                    entry[value_window_entry(layer)], [k for k, _, _ in groups], [h for _, h, _ in groups],
                    [c for _, _, c in groups], entry[value_entry(layer)], None, scale, False, plan.sink,
                    window_lengths=windows.window, middle_lengths=windows.middle, window_start=windows.middle)
        elif groups:
            out = b(ops.pruned_attention.default, query, [k for k, _, _ in groups], [h for _, h, _ in groups],
                    [c for _, _, c in groups], entry[value_entry(layer)], None, scale, False, counts.after, window)
        else:
            out = b(ops.attention.default, query, entry[key_entry(layer)], entry[value_entry(layer)], None, scale,
                    False, counts.after, window)
        if counts.place is not None:
            out = _tokens_at(b, out, counts.place)
        if layer in plan.merges:
            out = b(ops.project_heads.default, out, constant["output_order"], constant["output_up"])
    out.meta.update(site.attention.meta)
    site.attention.replace_all_uses_with(out)
    b.graph.erase_node(site.attention)


class _SharedCounts:
    """Each row's counts and this call's slots, computed once per graph from the cache's `lengths`
    (every layer of a cache shares it) and written back once, after every site has read it."""

    def __init__(self, graph: torch.fx.Graph, plan: Plan):
        self.graph, self.plan = graph, plan
        self.made: dict[torch.fx.Node, _Counts] = {}

    def of(self, lengths, prompt, mask, new_key) -> "_Counts":
        if lengths not in self.made:
            self.made[lengths] = _Counts(_Builder(self.graph), self.plan, lengths, prompt, mask, new_key)
        return self.made[lengths]

    def write_back(self) -> None:
        with self.graph.inserting_before(self.graph.output_node()):
            for lengths, counts in self.made.items():
                self.graph.call_function(torch.ops.aten.copy_.default, (lengths, counts.after))


class _Counts:
    """index (B, S): each new token's index in its row (a prompt's padding after its real tokens);
    after (B,): each row's count once they are written; `windows` the same for windowed layers."""

    def __init__(self, b, plan: Plan, lengths, prompt: bool, mask, new_key):
        self.b, self.plan, self.lengths, self.prompt = b, plan, lengths, prompt
        self.place = None  # where each of a continuation's queries is attended (None: where it is)
        if prompt:
            self.index, self.after = _call_indices(b, _real_tokens_of_prompt(b, mask, new_key))
        else:
            self.index, self.after, self.place = _continuation_indices(b, lengths, mask, new_key)
        self._windows = None

    def windows(self, middle_entry: torch.fx.Node) -> "_WindowCounts":
        if self._windows is None:
            self._windows = _WindowCounts(self.b, self.plan, self, middle_entry)
        return self._windows


class _WindowCounts:
    """Where a windowed layer's new tokens go and what a decode step attends over. Kept channels of
    every token go to the middle (slot c - sink; sink tokens to the spare slots after the middle's
    capacity), every channel to the window (sink slots, then the ring). A decode step attends over
    the runtime's middle before its token (`middle`) and the window after it (`window`)."""

    def __init__(self, b, plan: Plan, counts: _Counts, middle_entry: torch.fx.Node):
        sink, ring, index, after = plan.sink, window_ring(plan), counts.index, counts.after
        is_sink = b(operator.lt, index, sink)
        spare_from = b(operator.sub, b(torch.ops.aten.sym_size.int, middle_entry, 2), sink)
        self.middle_slot = b(torch.where, is_sink, b(operator.add, index, spare_from), b(operator.sub, index, sink))
        ring_slot = b(operator.add, b(operator.mod, b(operator.sub, index, sink), ring), sink)
        if counts.prompt:
            # a prompt keeps its last ring - 1 tokens; older ones and padding go to the slot the next
            # token takes, which holds none of the tokens kept
            row_after = b(operator.getitem, after, (slice(None), None))
            kept = b(torch.logical_and, b(operator.ge, index, b(operator.sub, row_after, ring - 1)),
                     b(operator.lt, index, row_after))
            spare = b(operator.add, b(operator.mod, b(torch.clamp, b(operator.sub, after, sink), min=0), ring), sink)
            ring_slot = b(torch.where, kept, ring_slot, b(operator.getitem, spare, (slice(None), None)))
        self.window_slot = b(torch.where, is_sink, index, ring_slot)
        self.middle = _middle_length(b, plan, counts.lengths)
        self.window = b(operator.sub, after, self.middle)


def _ring_slot(b, counts: _Counts, ring, window: int):
    """Where a sliding layer's new tokens go in its ring of C = window slots: token t to slot t % C.
    A prompt keeps its last window - 1 tokens; older ones and padding go to the slot the next token
    takes, which holds none of the tokens kept."""
    capacity = b(torch.ops.aten.sym_size.int, ring, 2)
    slot = b(operator.mod, counts.index, capacity)
    if counts.prompt:
        row_after = b(operator.getitem, counts.after, (slice(None), None))
        kept = b(torch.logical_and, b(operator.ge, counts.index, b(operator.sub, row_after, window - 1)),
                 b(operator.lt, counts.index, row_after))
        spare = b(operator.getitem, b(operator.mod, counts.after, capacity), (slice(None), None))
        slot = b(torch.where, kept, slot, spare)
    return slot


def _middle_length(b, plan: Plan, counts):
    """`plan.middle_length` of each row's count, on the device."""
    moved = b(torch.floor_divide, b(operator.sub, counts, plan.sink + plan.recent), plan.buffer)
    return b(torch.clamp, b(operator.mul, moved, plan.buffer), min=0)


def _continuation_indices(b, lengths, mask, new_key):
    """(index (B, S), after (B,), place (B, S) or None) of a call continuing rows of `lengths` tokens,
    padded (or not) by the model's attention_mask (B, P + S) anywhere: each row's real tokens after
    its own, its padding past its new count, which no query reads. The attention lets query i see
    slots up to count - S + i, right for a row's real tokens only where they are its last (left
    padding); `place` moves each query there, padding first and the real tokens in order after it
    (None where the call has one token, or no mask)."""
    # a call of static length slices the mask by a constant: the graph then reads only the mask's
    # tail, which the backend narrows to a static input as the mask grows (kvcompile/growing_inputs.py)
    example = new_key.meta["example_value"]
    new_tokens = example.shape[2]
    symbolic = not isinstance(new_tokens, int)
    if symbolic:
        new_tokens = b(torch.ops.aten.sym_size.int, new_key, 2)
    padding = _padding_input(mask)
    place = None
    if padding is None:
        step, added = b(torch.arange, new_tokens, device=example.device), new_tokens
    else:
        tail = slice(b(operator.neg, new_tokens) if symbolic else -new_tokens, None)
        step, added = _call_indices(b, b(operator.ne, b(operator.getitem, padding, (slice(None), tail)), 0))
        if symbolic or new_tokens > 1:  # real token r of n goes to S - n + r, padding token n + k to k
            place = b(operator.mod, b(operator.sub, step, b(operator.getitem, added, (slice(None), None))), new_tokens)
    index = b(operator.add, b(operator.getitem, lengths, (slice(None), None)), step)
    return index, b(operator.add, lengths, added), place


def _tokens_at(b, x, order):
    """x (B, H, S, D) with token j of row r taken from token order[r, j]."""
    order = b(operator.getitem, order, (slice(None), None, slice(None), None))  # (B, 1, S, 1)
    return b(torch.gather, x, 2, b(torch.Tensor.expand_as, order, x))


def _real_tokens_of_prompt(b, mask, new_key):
    """(B, S) bool: a prompt's real tokens, those that attend to themselves: the diagonal of HF's
    mask over the prompt (all, without a mask)."""
    if mask is None:
        return b(torch.ones_like, b(operator.getitem, new_key, (slice(None), 0, slice(None), 0)), dtype=torch.bool)
    diagonal = b(torch.diagonal, b(operator.getitem, mask, (slice(None), 0)), 0, -2, -1)
    return diagonal if mask.meta["example_value"].dtype == torch.bool else b(operator.eq, diagonal, 0)


def _padding_input(mask) -> torch.fx.Node | None:
    """The model's 2-D `attention_mask` (B, P + S), the graph input (dynamo names it after the
    argument) HF built the attention's mask from: a later call's padding is in its last S columns.
    HF's mask itself covers the call's tokens at the cache's offset 0, the prompt's columns, which
    is right at the prompt only."""
    if not isinstance(mask, torch.fx.Node):
        return None
    seen, stack, found = set(), [mask], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        value = node.meta.get("example_value")
        if (node.op == "placeholder" and "attention_mask" in node.name and isinstance(value, torch.Tensor)
                and value.dim() == 2 and not value.dtype.is_floating_point):
            found.append(node)
        stack.extend(node.all_input_nodes)
    return found[0] if len(found) == 1 else None


def _call_indices(b, valid):
    """(index (B, S), counts (B,)) of a call's tokens within it, `valid` (B, S) marking the real
    ones: row b's real tokens are its tokens 0..n_b - 1 in order, its padding n_b onwards."""
    counts = b(torch.sum, valid, 1)
    padding_index = b(operator.add, b(operator.getitem, counts, (slice(None), None)),
                      b(torch.cumsum, b(torch.logical_not, valid), 1))
    index = b(torch.where, valid, b(torch.cumsum, valid, 1), padding_index)
    return b(operator.sub, index, 1), counts


class _Builder:
    """`b(op, *args, **kwargs)`: a call_function node at the graph's insert point."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph

    def __call__(self, op, *args, **kwargs) -> torch.fx.Node:
        return self.graph.call_function(op, args, kwargs)
