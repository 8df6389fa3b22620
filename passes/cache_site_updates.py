"""Apply a plan's low-rank projection updates (plan.py's LayerUpdate) in a graph dynamo captured
from a Hugging Face forward on a `kvcompile.StaticCompressedCache`.

`update_projections` gives a captured program new weights W + b @ a. A dynamo graph takes the
model's weights as inputs, and its constants must come from inputs too (AOTAutograd traces a dynamo
graph's tensors as fake ones), so here the update runs beside the user's weight, as a low-rank
branch on the linear layer's output:

    y = linear(x, W, bias)  ->  y + pad(linear(linear(x, a), b))     (x (W + b a)^T = x W^T + (x a^T) b^T)

`pad` puts a q, k or v update on its rows of a fused projection's output. The factors ride on the
layer's cache like its merge maps (`site_constants`), and the linear layers are found from the
cache site: the nearest linear layer behind its new key and value and behind the attention's query
(through RoPE, QK-norm, views and a fused projection's slice), and the first after the attention
(the output projection). Runs before `lower_cache_sites`, which then merges and prunes the updated
projections' outputs as it would the model's own.
"""

from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx
import torch.nn.functional as F

from kvcompile.plan import Plan, PlanError

from .cache_sites import CacheSite, find_cache_sites, site_constant_names

_LINEAR = (torch._C._nn.linear, F.linear)


def update_projections_at_cache_sites(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    for site in find_cache_sites(gm):
        update = plan.updates.get(site.layer)
        if update is None:
            continue
        constants = dict(zip(site_constant_names(plan, site.layer), site.marker.args[4], strict=True))
        new_key, new_value = site.marker.args[:2]
        heads = {"query": site.arguments["query"], "key": new_key, "value": new_value}
        branches: dict[torch.fx.Node, list] = {}
        for name, (b, _) in update.factors.items():
            if name == "output":
                linear, rows = _output_projection(site), None
            else:
                linear, rows = _projection_behind(heads[name], site.layer, name, b.shape[0])
            branches.setdefault(linear, []).append((rows, constants[f"update.{name}.a"], constants[f"update.{name}.b"]))
        for linear, parts in branches.items():
            _add_low_rank_branches(gm.graph, linear, parts)
    return gm


def _add_low_rank_branches(graph: torch.fx.Graph, linear: torch.fx.Node, parts) -> None:
    """`linear`'s users read its output plus each part's x a^T b^T, padded onto the part's rows."""
    users = list(linear.users)
    x, out_features = linear.args[0], linear.meta["example_value"].shape[-1]
    with graph.inserting_before(linear.next):  # in order, right after the linear layer
        total = linear
        for rows, a, b in parts:
            branch = graph.call_function(torch._C._nn.linear, (graph.call_function(torch._C._nn.linear, (x, a)), b))
            if rows is not None:
                branch = graph.call_function(F.pad, (branch, (rows[0], out_features - rows[1])))
            total = graph.call_function(operator.add, (total, branch))
    for user in users:
        user.replace_input_with(linear, total)


def _projection_behind(heads: torch.fx.Node, layer: int, name: str, rows: int):
    """(the linear layer `heads` come from, its output rows [start, end) that hold them, or None
    when they are the whole output): the nearest linear layer on every path back from `heads`."""
    found = _nearest_linear_layers(heads, lambda node: node.all_input_nodes)
    if len(found) != 1:
        raise PlanError(f"layer {layer}, field updates: the {name} heads come from {len(found)} linear layers in the "
                        "graph dynamo captured, not one: kvcompile cannot tell which projection the update is of")
    (linear, reader), = found.items()
    out_features = linear.meta["example_value"].shape[-1]
    if out_features == rows:
        return linear, None
    span = _sliced_rows(reader, linear, out_features)
    if span is None or span[1] - span[0] != rows:
        raise PlanError(f"layer {layer}, field updates: the {name} update has {rows} rows, and its heads are "
                        f"{'not a slice' if span is None else f'rows {span[0]}:{span[1]}'} of a linear layer of "
                        f"{out_features} outputs (a fused projection read in a way kvcompile does not follow)")
    return linear, span


def _sliced_rows(reader: torch.fx.Node, linear: torch.fx.Node, out_features: int) -> tuple[int, int] | None:
    """[start, end) of the last dim when `reader` is `linear[..., start:end]`, else None."""
    if reader.target is not operator.getitem or reader.args[0] is not linear:
        return None
    index = reader.args[1]
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice) or index[-1].step not in (None, 1):
        return None
    ndim = linear.meta["example_value"].dim()
    leading = index[:-1]
    if leading != (Ellipsis,) and leading != (slice(None),) * (ndim - 1):
        return None
    start, end = index[-1].start or 0, index[-1].stop
    return start, out_features if end is None else min(end, out_features)


def _output_projection(site: CacheSite) -> torch.fx.Node:
    """The nearest linear layer on every path on from the site's attention: its output projection."""
    found = _nearest_linear_layers(site.attention, lambda node: node.users)
    if len(found) != 1:
        raise PlanError(f"layer {site.layer}, field updates: the attention's output reaches {len(found)} linear layers "
                        "in the graph dynamo captured, not one: kvcompile cannot tell which is the output projection")
    return next(iter(found))


def _nearest_linear_layers(start: torch.fx.Node, neighbours) -> dict[torch.fx.Node, torch.fx.Node]:
    """The linear layers first met on each path from `start` through `neighbours` (a node's inputs,
    or its users), each with the node it was met from."""
    found, seen, queue = {}, {start}, deque([start])
    while queue:
        node = queue.popleft()
        for other in neighbours(node):
            if other.op == "call_function" and other.target in _LINEAR:
                found[other] = node
            elif other not in seen:
                seen.add(other)
                queue.append(other)
    return found
