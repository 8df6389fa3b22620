"""The explicit-cache calling convention every program shares (eager runtime, calibration, ONNX, tests).

    inputs : input_ids (B, S), position_ids (B, S), then past_{entry} for each cache entry read,
             then the index inputs a pass added (below)
    outputs: logits (B, S, V), then present_{entry} for each cache entry written

An entry is one named tensor of the cache (cache.py names them: `key.{l}`, `key.{l}.w{w}`,
`value.{l}`, `key_window.{l}`, ...). A program's `Signature` lists its input and output names in
order, so callers pass and receive entries by name and never by position: `call_program` is the one
place a program is called with a cache, `empty_entries` the one place a prefill's empty past is made.
Passes that change what the cache holds edit the signature (see prune_k_channels).

The runtime's programs take index inputs besides (cache.py computes them per call):

    prefill_mask   (B, 1, S, S) bool  which prompt tokens each prompt token attends (padding, causality)
    cache_slots    (B, S)   where this call's tokens go in each row of the full-length entries
    cache_lengths  (B,)     tokens each row of those entries holds once they are written (a sliding
                            layer's rings take slot cache_slots % capacity: layout.py)
    window_slots, window_lengths    the same for the full-channel windows (windowed plans)
    middle_lengths (B,)     tokens each row of the pruned middle holds (windowed plans)

With those, a decode program writes its tokens into the entries it reads (`kvcompile::write_cache`)
and writes no `present_` output (see passes/write_cache_in_place.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.fx

from .layout import entry_layer
from .plan import ModelShape, Plan

SIGNATURE_KEY = "kvcompile.signature"
SHAPE_KEY = "kvcompile.shape"  # the ModelShape of the captured model: its sliding windows, for the passes
TOKEN_INPUTS = ("input_ids", "position_ids")
LOGITS = "logits"
PREFILL_MASK = "prefill_mask"
CACHE_SLOTS, CACHE_LENGTHS = "cache_slots", "cache_lengths"
WINDOW_SLOTS, WINDOW_LENGTHS, MIDDLE_LENGTHS = "window_slots", "window_lengths", "middle_lengths"
_PAST, _PRESENT = "past_", "present_"


def past(entry: str) -> str:
    """Program input name of cache entry `entry`."""
    return _PAST + entry


def present(entry: str) -> str:
    """Program output name of cache entry `entry`."""
    return _PRESENT + entry


def placeholder_name(input_name: str) -> str:
    """FX placeholder name of a program input (FX names are identifiers)."""
    return input_name.replace(".", "_")


@dataclass
class Signature:
    """Names of a program's positional inputs and flat outputs, in order."""

    inputs: list[str]
    outputs: list[str]

    @property
    def cache_inputs(self) -> list[str]:
        """The entries the program reads, in input order."""
        return [name.removeprefix(_PAST) for name in self.inputs if name.startswith(_PAST)]

    @property
    def index_inputs(self) -> list[str]:
        """Inputs that are neither tokens nor cache entries (prefill_mask, cache_slots, ...)."""
        return [name for name in self.inputs if name not in TOKEN_INPUTS and not name.startswith(_PAST)]

    @property
    def cache_outputs(self) -> list[str]:
        """The entries the program writes, in output order."""
        return [name.removeprefix(_PRESENT) for name in self.outputs if name.startswith(_PRESENT)]

    def copy(self) -> "Signature":
        return Signature(list(self.inputs), list(self.outputs))


def signature_of(gm: torch.fx.GraphModule) -> Signature:
    return gm.meta[SIGNATURE_KEY]


def model_shape_of(gm: torch.fx.GraphModule) -> ModelShape:
    """The shape of the model a program was captured from."""
    return gm.meta[SHAPE_KEY]


def call_program(
    program: torch.fx.GraphModule,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    entries: Mapping[str, torch.Tensor],
    indices: Mapping[str, torch.Tensor] | None = None,
    *,
    run: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `program` on tokens, the cache entries it reads and its index inputs; (logits, the
    entries it writes as outputs).

    `run` executes the program's graph instead of the program itself (an fx Interpreter's `run`,
    the program compiled)."""
    sig = signature_of(program)
    indices = indices or {}
    missing = [entry for entry in sig.cache_inputs if entry not in entries]
    if missing:
        raise KeyError(f"the program reads cache entries {missing}, which the cache does not hold")
    missing = [name for name in sig.index_inputs if name not in indices]
    if missing:
        raise KeyError(f"the program takes index inputs {missing}, which were not given")
    values = {"input_ids": input_ids, "position_ids": position_ids, **indices}
    values.update({past(entry): entries[entry] for entry in sig.cache_inputs})
    outputs = (program if run is None else run)(*(values[name] for name in sig.inputs))
    named = dict(zip(sig.outputs, outputs))
    return named.pop(LOGITS), {name.removeprefix(_PRESENT): tensor for name, tensor in named.items()}


def empty_entries(
    entries: list[str], plan: Plan, shape: ModelShape, batch: int, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """No tokens for each of a prefill program's cache inputs (`key.{l}` / `value.{l}`), with the
    layer's KV heads and head dim after the plan's merges."""
    empty = {}
    for entry in entries:
        heads, width = plan.kv_heads(entry_layer(entry), shape)
        empty[entry] = torch.empty(batch, heads, 0, width, dtype=dtype, device=device)
    return empty


def clone_program(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the graph that passes may rewrite; parameters stay shared, not copied."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    clone = torch.fx.GraphModule(gm, graph)
    # passes append to or rewrite these; everything else in meta is shared
    clone.meta.update({key: copy.copy(value) for key, value in gm.meta.items()})
    clone.meta[SIGNATURE_KEY] = signature_of(gm).copy()
    return clone
