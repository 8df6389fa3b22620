"""A site's projection weights: which rows (q, k, v) or columns (the output projection) of which
linear layer's weight belong to which projection, fused or not, and how a pass gives a linear layer
new weights without touching the user's model (merge_kv_heads folds maps into them,
update_projections adds a plan's low-rank updates)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx

from kvcompile.capture import USER_MODEL_PREFIX

from .graph import add_constant
from .sites import AttentionSite, data_input

aten = torch.ops.aten
# {name in the user's model: the tensor the program computes with instead}: what save_pretrained writes
REPLACED_PARAMETERS_KEY = "kvcompile.replaced_parameters"
_ORIGINS_KEY = "kvcompile.parameter_origins"  # {constant a pass added: the user's parameter it replaces}


@dataclass
class Segment:
    """Rows [start, end) of a linear layer's output that hold one of q, k or v; `slice` is the
    node cutting them out of a fused projection's output, None when the layer computes only them."""

    linear: torch.fx.Node
    slice: torch.fx.Node | None
    start: int
    end: int


def segment(gm: torch.fx.GraphModule, linear: torch.fx.Node, source: torch.fx.Node) -> Segment:
    """Where `source` (the q, k or v heads) sits in `linear`'s output: a slice when fused."""
    out_features = fetch(gm, linear.args[1].target).shape[0]
    node = source
    while node is not linear:
        if node.target == aten.slice.Tensor and node.args[0] is linear and node.args[1] in (-1, 2):
            return Segment(linear, node, node.args[2], min(node.args[3], out_features))
        node = data_input(node)
    return Segment(linear, None, 0, out_features)


def head_sources(site: AttentionSite) -> dict[str, tuple[torch.fx.Node, torch.fx.Node]]:
    """(linear layer, the heads it yields before RoPE) of the query, key and value projections, by
    the plan's PROJECTIONS names."""
    return {"query": (site.q_proj, site.query_pre_rope), "key": (site.k_proj, site.key_pre_rope),
            "value": (site.v_proj, site.new_value)}


def head_segments(gm: torch.fx.GraphModule, site: AttentionSite) -> dict[str, Segment]:
    """The query, key and value projections' segments."""
    return {name: segment(gm, linear, source) for name, (linear, source) in head_sources(site).items()}


@dataclass
class ProjectionWeight:
    """One linear layer's weight and the projections it computes: `parts` name → [start, end) of
    its rows, or of its columns for the output projection (`columns`)."""

    linear: torch.fx.Node
    parts: dict[str, tuple[int, int]]
    columns: bool

    def part_shapes(self, weight: torch.Tensor) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection's share of `weight`: the shape its delta has."""
        rows, columns = weight.shape
        return {name: (rows, end - start) if self.columns else (end - start, columns)
                for name, (start, end) in self.parts.items()}

    def with_deltas(self, weight: torch.Tensor, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """`weight` with `deltas[name]` added to the rows (columns) of each projection named."""
        dim = 1 if self.columns else 0
        pieces, cursor = [], 0
        for name, (start, end) in sorted(self.parts.items(), key=lambda item: item[1]):
            pieces.append(weight.narrow(dim, cursor, start - cursor))
            own = weight.narrow(dim, start, end - start)
            if name in deltas:  # summed in the update's precision, on the weight's device
                delta = deltas[name].to(own.device)
                own = (own.to(delta.dtype) + delta).to(own.dtype)
            pieces.append(own)
            cursor = end
        pieces.append(weight.narrow(dim, cursor, weight.shape[dim] - cursor))
        return torch.cat(pieces, dim=dim)


def projection_weights(gm: torch.fx.GraphModule, site: AttentionSite) -> list[ProjectionWeight]:
    """The weights of a site's query, key, value and output projections, one per linear layer."""
    weights: dict[torch.fx.Node, ProjectionWeight] = {}
    for name, seg in head_segments(gm, site).items():
        weights.setdefault(seg.linear, ProjectionWeight(seg.linear, {}, False)).parts[name] = (seg.start, seg.end)
    in_features = fetch(gm, site.o_proj.args[1].target).shape[1]
    weights[site.o_proj] = ProjectionWeight(site.o_proj, {"output": (0, in_features)}, True)
    return list(weights.values())


def fetch(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr target names."""
    return functools.reduce(getattr, target.split("."), gm)


def swap_parameter(gm: torch.fx.GraphModule, linear: torch.fx.Node, index: int, tensor: torch.Tensor,
                   prefix: str) -> None:
    """Make `linear` read `tensor` (a new constant of the program named after the user's parameter,
    with `prefix`) as its argument `index` (1: weight, 2: bias), recording which parameter of the
    user's model it replaces, through any earlier pass's replacement."""
    old = linear.args[index].target
    origins = gm.meta.setdefault(_ORIGINS_KEY, {})
    origin = origins.get(old, old.removeprefix(USER_MODEL_PREFIX))
    name = f"{prefix}_{(USER_MODEL_PREFIX + origin).replace('.', '_')}"
    linear.update_arg(index, add_constant(gm, name, tensor.detach()))
    origins[name] = origin
    gm.meta.setdefault(REPLACED_PARAMETERS_KEY, {})[origin] = getattr(gm, name)
