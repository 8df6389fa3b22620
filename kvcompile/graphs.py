"""Decode steps replayed from CUDA graphs, as serving engines run them.

A one-token step of the in-place decode program (passes/write_cache_in_place.py) is a fixed
sequence of kernels over fixed memory: the cache's buffers, which it writes in place, and a few
small per-step tensors (tokens, positions, write slots, row lengths). Run op by op from Python it
pays a host launch for every node; captured once into a CUDA graph, a step is one replay, after
copying the per-step tensors into the graph's own. Nothing in such a step reads a tensor's values
on the host (the attention kernels bound each row by its length on the device), so it captures.

A graph is keyed by the buffers it was captured over (their addresses and shapes) and the step's
shapes: a cache that grew, or another cache, is captured anew; the few latest graphs are kept.

What a graph replays is, by default, the program compiled by inductor (`torch.compile`): a step's
norms, rotations, activations and residuals are a few hundred tiny kernels run one by one, and
inductor fuses them into a few per layer; kvcompile's ops (the cache writes, the attention kernels)
stay calls of their own. The cache writes are in place under inductor too (it functionalizes the
mutation, then re-inplaces it into the input buffer: no copy of the cache). Compiling costs time
once per new kind of shape, not per capture: after a second batch size or capacity, dynamo's
automatic dynamic shapes give one program for all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.fx

from .program import call_program

KEPT_GRAPHS = 4


@dataclass
class _Step:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's own copies of the per-step tensors
    logits: torch.Tensor  # written by every replay


class GraphedDecode:
    """Calls the decode program like `call_program`, replaying a captured graph of it."""

    def __init__(self, program: torch.fx.GraphModule, kept: int = KEPT_GRAPHS, compile: bool = True):
        self.program, self.kept = program, kept
        # what a capture runs: the program, or its inductor-compiled form (called like it)
        self._run = torch.compile(program, fullgraph=True) if compile else program
        self._steps: OrderedDict[tuple, _Step] = OrderedDict()
        self._pool = None  # one memory pool for every graph's intermediates

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, entries: dict[str, torch.Tensor],
                 indices: dict[str, torch.Tensor]) -> torch.Tensor:
        per_step = {"input_ids": input_ids, "position_ids": position_ids, **indices}
        key = (
            tuple((name, tuple(t.shape), t.dtype) for name, t in per_step.items()),
            tuple((name, t.data_ptr(), tuple(t.shape)) for name, t in entries.items()),
        )
        step = self._steps.get(key)
        if step is None:
            step = self._capture(per_step, entries)
            self._steps[key] = step
            while len(self._steps) > self.kept:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        for name, tensor in per_step.items():
            step.inputs[name].copy_(tensor)
        step.graph.replay()
        return step.logits.clone()  # the next replay overwrites the graph's output

    def _capture(self, per_step: dict[str, torch.Tensor], entries: dict[str, torch.Tensor]) -> _Step:
        inputs = {name: tensor.clone() for name, tensor in per_step.items()}

        def run() -> torch.Tensor:
            indices = {name: t for name, t in inputs.items() if name not in ("input_ids", "position_ids")}
            return call_program(self.program, inputs["input_ids"], inputs["position_ids"], entries, indices,
                                run=self._run)[0]

        # Warm up outside the graph (Triton compiles, allocators settle). These runs write this
        # step's tokens into the slots the step itself writes, so they change nothing it keeps.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # captured on the stream it warmed up on (lazily made state, such as cuBLAS workspaces, is per stream)
        with torch.cuda.graph(graph, pool=self._pool, stream=side):
            logits = run()
        self._pool = graph.pool()
        return _Step(graph, inputs, logits)
