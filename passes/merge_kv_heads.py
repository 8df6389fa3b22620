"""Merge KV heads: each group of t KV heads of a layer becomes one KV head of s·d channels.

Runs on canonical sites. With `down`/`up` maps per group (calibration/bases.py; c = k_group @ down,
k_group ≈ c @ up), for query head j of original KV head h (position p in its group):

    scores   q_j · k_h ≈ (q_j @ up_pᵀ) · c          queries become s·d wide
    values   v_group ≈ c_v @ up_v, so o_j ≈ o'_j @ up_v,p  and  W_O'_j = W_O_j @ up_v,pᵀ

Values always fold: W_V rows become down_vᵀ W_V per group, W_O columns absorb up_v. Keys depend
on the plan's RoPE mode:

- "commute"/"none": the maps commute with RoPE (or there is none), so they fold into the
  projections before it: W_K rows down_kᵀ W_K, W_Q rows up_k,p W_Q. RoPE then rotates the s
  sub-heads of d channels each; they are regrouped into one s·d head after it. No run-time cost.
- "post": W_K and W_Q stay; the post-RoPE key is merged by `kvcompile::merge_heads` before the
  cache, and each post-RoPE query projected by `kvcompile::project_heads`.

Query heads are reordered so that the heads of one merged group are contiguous (GQA); W_Q and
W_O follow the order. New weights are registered on the program; the user's model is untouched.
The softmax scale stays the original 1/sqrt(d).
"""

from __future__ import annotations

import torch
import torch.fx

from kvcompile.plan import LayerMerge, Plan
from kvcompile.rope import RopeLayout, apply_rope

from .graph import PassError, add_constant, require_canonical
from .projections import fetch, head_segments, head_sources, swap_parameter
from .sites import LAYOUT_OPS, AttentionSite, find_attention_sites

aten = torch.ops.aten


class MergeError(PassError):
    pass


def merge_kv_heads(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    for site in find_attention_sites(gm):
        merge = plan.merges.get(site.layer)
        if merge is None:
            continue
        require_canonical(site, "merge_kv_heads")
        _LayerMerger(gm, site, merge).run()
    gm.graph.eliminate_dead_code()
    return gm


def query_order(merge: LayerMerge, per_kv: int) -> list[int]:
    """Query heads grouped by merged KV head: new query head i reads original query head order[i]
    (`per_kv` query heads per original KV head), so each merged head's queries are contiguous (GQA)."""
    return [h * per_kv + i for group in merge.groups for h in group for i in range(per_kv)]


def head_up(merge: LayerMerge, up: torch.Tensor, kv_head: int, d: int) -> torch.Tensor:
    """up_p (s·d, d) of original KV head `kv_head`, the p-th of its group g: up[g]'s columns of it."""
    g, p = next((g, group.index(kv_head)) for g, group in enumerate(merge.groups) if kv_head in group)
    return up[g][:, p * d : (p + 1) * d]


class _LayerMerger:
    def __init__(self, gm: torch.fx.GraphModule, site: AttentionSite, merge: LayerMerge):
        self.gm, self.site, self.merge = gm, site, merge
        self.layer = site.layer
        _, self.num_heads, _, self.d = site.query.meta["val"].shape
        self.num_kv_heads = site.new_key.meta["val"].shape[1]
        self.per_kv = self.num_heads // self.num_kv_heads
        self.s = merge.heads_per_group
        self.order = query_order(merge, self.per_kv)

    def fail(self, message: str):
        raise MergeError(f"layer {self.layer} ({self.site.module_path}): {message}")

    # -- the rewrite ---------------------------------------------------------------------------

    def run(self) -> None:
        site, merge = self.site, self.merge
        if merge.rope == "none" and site.rope is not None:
            self.fail("the keys are rotated (RoPE); rope='none' would fold across it, use 'commute' or 'post'")
        fold_keys = merge.rope in ("commute", "none")
        if fold_keys and site.rope is not None:
            self._check_commutes()

        new_rows = {"value": lambda rows: self._grouped_rows(rows, merge.value_down)}
        if fold_keys:
            new_rows["key"] = lambda rows: self._grouped_rows(rows, merge.key_down)
            new_rows["query"] = self._query_rows
        self._replace_rows(new_rows)
        self._replace_output_columns()

        regroup = self.s > 1
        if regroup:
            self._insert_after(site.new_value, _regroup_subheads, self.s)
        if fold_keys:
            if regroup:
                self._insert_after(site.new_key, _regroup_subheads, self.s)
                self._insert_after(site.query, _regroup_subheads, self.s)
        else:
            self._merge_post_rope()

    def _merge_post_rope(self) -> None:
        site, merge = self.site, self.merge
        groups = self._constant("groups", torch.tensor(merge.groups, dtype=torch.int64))
        down = self._constant("key_down", merge.key_down)
        self._insert_after(site.new_key, _call, torch.ops.kvcompile.merge_heads.default, groups, down)
        heads = self._constant("query_order", torch.tensor(self.order, dtype=torch.int64))
        weight = self._constant("query_up", torch.stack([self._up(merge.key_up, j).T for j in self.order]))
        self._insert_after(site.query, _call, torch.ops.kvcompile.project_heads.default, heads, weight)

    # -- the new weights -----------------------------------------------------------------------

    def _up(self, up: torch.Tensor, query_head: int) -> torch.Tensor:
        return head_up(self.merge, up, query_head // self.per_kv, self.d)

    def _grouped_rows(self, rows: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """rows (Hkv·d, ...) per KV head -> per merged head: down_gᵀ @ rows of the group's heads."""
        d = self.d
        merged = []
        for g, group in enumerate(self.merge.groups):
            group_rows = torch.cat([rows[h * d : (h + 1) * d] for h in group])
            merged.append(down[g].T.to(rows) @ group_rows)
        return torch.cat(merged)

    def _query_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (Hq·d, ...) per query head -> new query head i reading original head j = order[i]: up_p @ rows_j."""
        d = self.d
        return torch.cat([self._up(self.merge.key_up, j).to(rows) @ rows[j * d : (j + 1) * d] for j in self.order])

    def _replace_rows(self, new_rows: dict) -> None:
        """Give the q/k/v projections new output rows (weight and bias), fused or not.

        `new_rows[part]` maps that part's old rows to its new ones; parts not named keep theirs.
        """
        sources = head_sources(self.site)
        for part in new_rows:
            self._check_foldable(*sources[part], part)
            self._free_head_counts(*sources[part])
        segments = head_segments(self.gm, self.site)
        # In q, k, v order (a set's order follows node ids and would reorder the parameters each run).
        for linear in dict.fromkeys(segment.linear for segment in segments.values()):
            parts = sorted((p for p in segments if segments[p].linear is linear), key=lambda p: segments[p].start)
            if not any(p in new_rows for p in parts):
                continue
            sizes = []
            for index in (1, 2):  # weight, then bias
                if index >= len(linear.args) or linear.args[index] is None:
                    continue
                tensor = fetch(self.gm, linear.args[index].target)
                pieces = []
                for p in parts:
                    rows = tensor[segments[p].start : segments[p].end]
                    pieces.append(new_rows[p](rows) if p in new_rows else rows)
                sizes = [piece.shape[0] for piece in pieces]
                swap_parameter(self.gm, linear, index, torch.cat(pieces), "merged")
            offset = 0
            for p, size in zip(parts, sizes):
                if segments[p].slice is not None:  # a fused projection: move the part's slice
                    segments[p].slice.update_arg(2, offset)
                    segments[p].slice.update_arg(3, offset + size)
                offset += size

    def _replace_output_columns(self) -> None:
        o_proj = self.site.o_proj
        weight = fetch(self.gm, o_proj.args[1].target)  # (hidden, Hq·d)
        d = self.d
        columns = [weight[:, j * d : (j + 1) * d] @ self._up(self.merge.value_up, j).T.to(weight) for j in self.order]
        swap_parameter(self.gm, o_proj, 1, torch.cat(columns, dim=1), "merged")

    # -- graph and parameter plumbing ------------------------------------------------------------

    def _check_foldable(self, linear: torch.fx.Node, source: torch.fx.Node, part: str) -> None:
        """Folding into a projection's rows is exact only if nothing but layout ops lies between."""
        node = source
        while node is not linear:
            if not (_is_layout(node) or _is_scaling(node)):
                hint = "; use rope='post'" if part != "value" else ""
                self.fail(f"the {part} goes through {node.target} (a per-head op such as QK-norm) between its "
                          f"projection and the attention, which a merge cannot fold across{hint}")
            node = node.args[0]

    def _free_head_counts(self, linear: torch.fx.Node, source: torch.fx.Node) -> None:
        """A view to (B, S, heads, d) with a literal head count (OPT writes one) would misread the
        new rows: let the head count follow from the size instead."""
        node = source
        while node is not linear:
            shape = node.args[1] if node.target in (aten.view.default, aten.reshape.default) else None
            if shape is not None and len(shape) == 4 and isinstance(shape[2], int) and shape[2] != -1:
                sizes = list(shape)
                for dim in (0, 1):
                    if sizes[dim] == -1:
                        with self.gm.graph.inserting_before(node):
                            sizes[dim] = self.gm.graph.call_function(aten.sym_size.int, (node.args[0], dim))
                sizes[2] = -1
                node.update_arg(1, sizes)
            node = node.args[0]

    def _constant(self, kind: str, tensor: torch.Tensor) -> torch.fx.Node:
        like = fetch(self.gm, self.site.o_proj.args[1].target)
        dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
        return add_constant(self.gm, f"merge_{kind}_{self.layer}", tensor.to(device=like.device, dtype=dtype))

    def _insert_after(self, node: torch.fx.Node, build, *args) -> torch.fx.Node:
        """Route every user of `node` except the new nodes through `build(graph, node, *args)`."""
        users = list(node.users)
        with self.gm.graph.inserting_before(node.next):
            new = build(self.gm.graph, node, *args)
        for user in users:
            user.replace_input_with(node, new)
        return new

    def _check_commutes(self) -> None:
        """Commute mode folds through RoPE: make sure the maps really commute with this layout."""
        layout = RopeLayout(self.site.rope.layout, self.site.rope.rotary_dims)
        generator = torch.Generator().manual_seed(self.layer)
        d = self.d
        positions = torch.randint(0, 4096, (4,), generator=generator)
        for name in ("key_down", "key_up"):
            for matrix in getattr(self.merge, name).double():
                rows_in = matrix.shape[0] // d
                x = torch.randn(4, rows_in, d, generator=generator, dtype=torch.float64)
                rotated_first = apply_rope(x, positions, layout).flatten(1) @ matrix
                rotated_after = apply_rope((x.flatten(1) @ matrix).view(4, -1, d), positions, layout).flatten(1)
                if not torch.allclose(rotated_first, rotated_after, atol=1e-4 * (1 + x.abs().max().item())):
                    self.fail(f"{name} does not commute with this layer's RoPE ({layout.kind}, "
                              f"{layout.rotary_dims} dims); rope='commute' needs bases from commuting_merge")


def _is_layout(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in LAYOUT_OPS


def _is_scaling(node: torch.fx.Node) -> bool:
    """x * c or x / c with a constant c (OPT pre-scales its queries): linear, so folds through."""
    return node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[1], (int, float))


def _call(graph: torch.fx.Graph, node: torch.fx.Node, op, *args) -> torch.fx.Node:
    return graph.call_function(op, (node, *args))


def _regroup_subheads(graph: torch.fx.Graph, node: torch.fx.Node, s: int) -> torch.fx.Node:
    """(B, H·s, S, d) with sub-heads minor -> (B, H, S, s·d)."""
    split = graph.call_function(aten.unflatten.int, (node, 1, [-1, s]))
    moved = graph.call_function(aten.permute.default, (split, [0, 1, 3, 2, 4]))
    return graph.call_function(aten.flatten.using_ints, (moved, 3, 4))
