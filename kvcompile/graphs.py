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

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

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


@dataclass
class _Replay:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the call's inputs as the graph reads them: its own copies of the per-step ones
    outputs: object  # written by every replay


class ReplayedCalls:
    """Calls of a compiled graph, `fn(*inputs)` as dynamo calls a backend's, replayed from CUDA graphs:
    what the torch.compile backend gives a static-shaped graph (a decode step) under
    mode="reduce-overhead" with options={"cuda_graphs": "kvcompile"}, in place of inductor's CUDA
    graph trees (the same compiled step captured by hand replayed faster than under them: the
    backend's section of the README).

    `static[i]` says input i keeps its address from call to call (the weights, the cache's buffers,
    which dynamo marks): the graph reads it where it is, and its address is part of the graph's key.
    The other inputs (tokens, positions, masks) are copied into the graph's own before each replay.
    A key's first call runs `fn` as it is; the second runs it on the capture stream (what is made
    lazily, such as cuBLAS's workspace, is made per stream), then captures it; later calls replay.
    So every call runs its step once: a step that changes the cache in place is not run again to
    warm up. A graph that writes into a per-step input is never captured (the write would land in the
    graph's copy), nor one whose capture fails; their calls run `fn`. Outputs are returned as copies:
    the next replay overwrites the graph's own.
    """

    def __init__(self, fn: Callable, static: Sequence[bool], kept: int = KEPT_GRAPHS):
        self._fn, self._static, self.kept = fn, tuple(static), kept
        self._replays: OrderedDict[tuple, _Replay | None] = OrderedDict()  # None: run fn, never captured
        self._seen: OrderedDict[tuple, None] = OrderedDict()  # keys called once
        self._pool = None  # one memory pool for every graph's intermediates
        self._stream: torch.cuda.Stream | None = None

    def __call__(self, *inputs: torch.Tensor):
        # dynamo guards the inputs' shapes, strides and dtypes; what it leaves free is where they are
        key = tuple(t.data_ptr() if static else t.stride() for t, static in zip(inputs, self._static, strict=True))
        if key in self._replays:
            self._replays.move_to_end(key)
            replay = self._replays[key]
            return self._run(inputs) if replay is None else self._replay(replay, inputs)
        if key not in self._seen:
            self._seen[key] = None
            while len(self._seen) > 4 * self.kept:
                self._seen.popitem(last=False)
            return self._run(inputs)
        del self._seen[key]
        outputs, self._replays[key] = self._run_and_capture(inputs)
        while len(self._replays) > self.kept:
            self._replays.popitem(last=False)
        return outputs

    @property
    def captured(self) -> int:
        """How many graphs it replays now."""
        return sum(replay is not None for replay in self._replays.values())

    def _run(self, inputs: Sequence[torch.Tensor]):
        # as dynamo calls a backend's callable: unpacked, whatever `_boxed_call` the wrapper
        # around inductor's code copied from it says
        return self._fn(*inputs)

    def _replay(self, replay: _Replay, inputs: Sequence[torch.Tensor]):
        for own, given, static in zip(replay.inputs, inputs, self._static):
            if not static:
                _unexpanded(own).copy_(_unexpanded(given))
        replay.graph.replay()
        return pytree.tree_map_only(torch.Tensor, torch.clone, replay.outputs)

    def _run_and_capture(self, inputs: Sequence[torch.Tensor]) -> tuple[object, _Replay | None]:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        per_step = [t for t, static in zip(inputs, self._static) if not static]
        before = [t.clone() for t in per_step]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = self._run(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        pytree.tree_map_only(torch.Tensor, lambda t: t.record_stream(torch.cuda.current_stream()), outputs)
        if any(not torch.equal(old, new) for old, new in zip(before, per_step)):
            return outputs, None
        if any(torch._debug_has_internal_overlap(_unexpanded(t)) != 0 for t in per_step):
            return outputs, None  # no copy could fill it
        own = [t if static else _copy_like(t) for t, static in zip(inputs, self._static)]
        graph = torch.cuda.CUDAGraph()
        try:
            # as inductor's trees capture: other threads of the user's program may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                captured = self._run(own)
        except RuntimeError as err:
            warnings.warn(f"kvcompile: this compiled graph runs without CUDA graphs, its capture failed: {err}",
                          stacklevel=2)
            return outputs, None
        self._pool = graph.pool()
        return outputs, _Replay(graph, own, captured)


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """`t` without its broadcast dimensions (stride 0, as `expand` makes): the part a copy can write."""
    for dim in range(t.dim()):
        if t.stride(dim) == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


def _copy_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with its strides, broadcast dimensions included (the compiled code checks them)."""
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    _unexpanded(copy).copy_(_unexpanded(t))
    return copy
