"""A growing input that a graph reads only in part becomes a static input of the graph.

Under transformers' `generate` the model's 2-D `attention_mask` grows by a column each step, so
dynamo soon compiles the decode step for a mask of any width (a symbolic size). Such a graph is
recorded anew by inductor's CUDA graph trees for every width it meets, and never replayed by
kvcompile's own graphs (graphs.ReplayedCalls takes static shapes only). Yet once the backend has
lowered the attention, a decode step reads the mask only at its last columns (the step's own
tokens' padding, passes/cache_sites.py): a part of static shape, at a constant index.

`narrow_growing_inputs` compiles the graph for that part: each input of symbolic shape whose every
use is such a part becomes one input per part, the part taken from the call's input before every
call (`Feed`), and the size symbols nothing reads any more are dropped. The graph then has static
shapes, and every decode step of `generate` replays one CUDA graph.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx


@dataclass(frozen=True)
class Feed:
    """How a call's inputs (dynamo's) become the narrowed graph's: per graph input, the position of
    the call's input it comes from and the index it is taken at (None: the input as it is)."""

    sources: tuple[tuple[int, tuple | None], ...]

    def __call__(self, inputs: Sequence) -> list:
        # contiguous: the compiled graph checks its inputs' strides, and a part's depend on the width
        return [inputs[i] if index is None else inputs[i][index].contiguous() for i, index in self.sources]


def narrow_growing_inputs(gm: torch.fx.GraphModule,
                          example_inputs: Sequence) -> tuple[torch.fx.GraphModule, Feed] | None:
    """`gm` (dynamo's graph, placeholders matching `example_inputs`) with static inputs in place of
    its growing ones (see the module docstring), as a new graph module (dynamo reads its own graph's
    placeholders after the backend), and how to feed it; None where no input has a symbolic size
    or one is read other than at parts of static shape."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    growing = [node for node in placeholders if _is_symbolic(node.meta.get("example_value"))]
    if not growing or len(placeholders) != len(example_inputs) or not all(
        all(_is_static_part(user) for user in node.users) if isinstance(node.meta["example_value"], torch.Tensor)
        else not node.users  # a size symbol nothing reads any more
        for node in growing
    ):
        return None
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # the nodes keep their meta
    sources = []
    for position, node in enumerate([node for node in gm.graph.nodes if node.op == "placeholder"]):
        if not _is_symbolic(node.meta.get("example_value")):
            sources.append((position, None))
            continue
        for number, part in enumerate(list(node.users)):
            index = part.args[1]
            with gm.graph.inserting_before(node):
                narrowed = gm.graph.placeholder(f"{node.name}_part{number}")
            narrowed.meta["example_value"] = example_inputs[position][index].contiguous()
            part.replace_all_uses_with(narrowed)
            gm.graph.erase_node(part)
            sources.append((position, index))
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, Feed(tuple(sources))


def _is_symbolic(value) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and not all(isinstance(size, int) for size in value.shape)


def _is_static_part(node: torch.fx.Node) -> bool:
    """Is `node` its input indexed by constants to the same shape whatever the input's symbolic sizes?"""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    growing, index = node.args
    if not _is_constant_index(index):
        return False
    value = growing.meta["example_value"]
    hint = [size if isinstance(size, int) else size.node.hint for size in value.shape]
    if any(size is None for size in hint):
        return False
    # the part's shape at the input's size now and at larger sizes of its symbolic dimensions
    shapes = {
        torch.empty([size if isinstance(symbolic, int) else size + grown for size, symbolic in zip(hint, value.shape)],
                    device="meta")[index].shape
        for grown in (0, 1, 7)
    }  # fmt: skip
    return len(shapes) == 1


def _is_constant_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if isinstance(item, slice):
            if not all(bound is None or isinstance(bound, int) for bound in (item.start, item.stop, item.step)):
                return False
        elif not (item is None or item is Ellipsis or isinstance(item, int)):
            return False
    return True
