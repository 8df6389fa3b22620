"""The kvcompile ops' ONNX face: for each op, the translation `torch.onnx.export` calls and the
model-local FUNCTION (standard ONNX ops) that says what its node computes.

`TRANSLATIONS` is the one table: op name -> `Translation(emit, function)`. `SUPPORTED_OPS` is a
view of its keys; `translation_table()` is the exporter's `custom_translation_table`;
`add_functions(model)` adds, after the export, the FUNCTION of every `ai.kvcompile` node the model
holds. kvcompile/export/onnx.py drives the export and says why it is built this way.

- **Every op stays one node** of domain `ai.kvcompile` (opset 1) with its scalar arguments as
  attributes (`scale`, `is_causal`), and a model-local function. A runtime with a fused kernel can
  claim the node; stock onnxruntime inlines the function. The bodies follow the reference
  implementations in ops.py (scores and softmax in fp32, as they are).
- **Variadic arguments become overloads.** `pruned_attention` takes one key tensor, head list and
  channel table per width group, and ONNX functions have fixed inputs. The number of groups is
  static per layer, so each arity gets its own function, told apart by the ONNX `overload` field
  (`groups2`, ...): every node keeps the op's name, inputs in the op's flattened order
  (q, k_0.., heads_0.., channels_0.., v, mask).
- **Per-row lengths are an overload too.** The decode reads cache buffers with capacity and each
  row's count instead of a mask (ops.py, "Caches written in place"): its attention nodes take
  `lengths` where the mask was (overload `lengths`, `groups2_lengths`, ...), and the function
  builds the mask from them (`_length_mask_nodes`). It attends over the whole capacity, so the
  cache keeps its free slots finite (cache.py allocates them zeroed). A sliding layer's cache is a
  ring: its nodes add the suffix `ring` and the attribute `window`, and the mask follows the
  sliding rule (`_ring_mask_nodes`). `windowed_attention` is exported in the lengths form only: the
  window and the middle each with their row counts.
- **The decode's products stream the cache.** onnxruntime's CPU GEMM packs its right operand
  (a copy) unless the left one has a single row; the decode's few query rows are therefore the
  right operand of the scores, (k @ q^T)^T, and meet V one row at a time (`_scores`,
  `_times_values`). The prefill's many rows keep the plain GEMMs.
- **Groups that cover every KV head in order skip the reordering.** A grouped node's scores are
  stacked per group and gathered into KV-head order, with a block of fill for heads in no group.
  The head lists are the plan's constants, seen only once the export returns: `add_functions` then
  gives the nodes whose lists, concatenated, are 0, 1, ... the overload suffix `ordered`, whose
  function stacks the groups' scores as they are (no fill, no gathers of scores or probabilities).
- **Nodes are emitted through the exporter's recorder** (`onnxscript.evaluator.default()`, which
  the exporter sets while it runs a translation): an onnxscript `@script` function cannot be
  variadic, and this keeps one code path for all ops.

This module imports onnx_ir and onnxscript only inside the functions that build nodes, and
kvcompile.kernels does not import it: onnx is an optional extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import ops  # noqa: F401  (registers torch.ops.kvcompile.*, which translation_table names)

DOMAIN = "ai.kvcompile"
DOMAIN_VERSION = 1
# The function bodies use ops unchanged since opset 18; once exported they import the opset the
# exporter emitted (20 with torch 2.13).
BODY_OPSET = 18

_FLOAT, _BOOL = 1, 9  # onnx.TensorProto.FLOAT, BOOL
# The overload (suffix) of an attention node that takes per-row cache lengths instead of a mask.
LENGTHS = "lengths"
# The overload (suffix) of an attention node over a sliding layer's ring (with lengths; its `window`
# an attribute): token t of a row in slot t % C, query i seeing the `window` tokens up to its own.
RING = "ring"
# The overload (suffix) of a grouped attention node whose groups' head lists, concatenated, are the
# KV heads 0, 1, ... in order: its group scores stack into KV-head order as they are (add_functions).
ORDERED = "ordered"


class TranslationError(RuntimeError):
    """A kvcompile op's arguments have no ONNX translation (or a translation ran outside an export)."""


@dataclass(frozen=True)
class Translation:
    """One op's ONNX face. `emit`: the translation torch.onnx.export calls with the op's
    arguments, recording its node(s). `function`: the model-local FUNCTION of the `ai.kvcompile`
    node `emit` records (given that node, for its arity)."""

    emit: Callable
    function: Callable


# --------------------------------------------------------------------------------------------
# recording nodes (inside torch.onnx.export)


def _record(domain: str, op_type: str, inputs: list, attributes: dict | None = None, num_outputs: int = 1, **node):
    """Append one node to the translation being recorded (`onnxscript.evaluator.default()` while
    torch.onnx.export runs one); returns its outputs."""
    import onnx_ir as ir
    import onnxscript.evaluator

    recorder = onnxscript.evaluator.default()
    if not hasattr(recorder, "nodes"):
        raise TranslationError(f"{domain or 'ai.onnx'}::{op_type} must be translated inside torch.onnx.export(dynamo=True)")
    attrs = [value if isinstance(value, ir.Attr) else ir.convenience.convert_attribute(name, value)
             for name, value in (attributes or {}).items()]
    created = ir.Node(domain, op_type, inputs, attributes=attrs, num_outputs=num_outputs, **node)
    recorder.nodes.append(created)
    return created.outputs


def _record_kvcompile(op_type: str, inputs: list, attributes: dict, overload: str = ""):
    """One ai.kvcompile node; `add_functions` adds its function once the export returns."""
    return _record(DOMAIN, op_type, inputs, attributes, overload=overload, version=DOMAIN_VERSION)[0]


def _attention_attrs(scale: float, is_causal: bool, window: int = 0) -> dict:
    attrs = {"scale": float(scale), "is_causal": int(bool(is_causal))}  # ONNX has no bool attribute
    return {**attrs, "window": int(window)} if window else attrs


def _bool_mask(mask):
    """The op's mask input: the program's boolean mask, or a broadcastable True when there is none.
    Additive float masks are not emitted by capture; refuse them rather than misread them."""
    import onnx_ir as ir

    if mask is None:
        return _record("", "Constant", [], {"value": ir.tensor(np.ones((1, 1, 1, 1), bool))})[0]
    if mask.dtype != ir.DataType.BOOL:
        raise TranslationError(f"attention masks of type {mask.dtype} are not supported by the ONNX export (boolean only)")
    return mask


# --------------------------------------------------------------------------------------------
# building function bodies (standard ONNX ops)


class _Body:
    """A small builder for one function body: named inputs, attribute references, ops."""

    def __init__(self, inputs: Sequence[str]):
        import onnx_ir as ir

        self.ir = ir
        self.inputs = [ir.Value(name=name) for name in inputs]
        self.nodes: list = []

    def op(self, op_type: str, *inputs, num_outputs: int = 1, **attributes):
        """The op's output, or its `num_outputs` outputs as a tuple when more than one."""
        ir = self.ir
        attrs = [value if isinstance(value, ir.Attr) else ir.convenience.convert_attribute(name, value)
                 for name, value in attributes.items()]
        node = ir.Node("", op_type, list(inputs), attributes=attrs, num_outputs=num_outputs)
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def ints(self, *values: int):
        return self.op("Constant", value_ints=list(values))

    def attribute(self, ref: str):
        """A scalar Constant holding the function attribute `ref` (`scale`: float, others: int)."""
        ir = self.ir
        kind, attr_type = ("value_float", ir.AttributeType.FLOAT) if ref == "scale" else ("value_int", ir.AttributeType.INT)
        node = ir.Node("", "Constant", [], attributes=[ir.RefAttr(kind, ref, attr_type)], num_outputs=1)
        self.nodes.append(node)
        return node.outputs[0]

    def shape(self, x, start: int, end: int | None = None):
        return self.op("Shape", x, start=start) if end is None else self.op("Shape", x, start=start, end=end)

    def function(self, name: str, output, attributes: Sequence[str] = (), overload: str = ""):
        ir = self.ir
        output.name = "output"
        graph = ir.Graph(self.inputs, [output], nodes=self.nodes, opset_imports={"": BODY_OPSET}, name=name)
        attrs = [ir.Attr(a, ir.AttributeType.FLOAT if a == "scale" else ir.AttributeType.INT, None) for a in attributes]
        return ir.Function(DOMAIN, name, overload, graph=graph, attributes=attrs)


def _masked_softmax_attention_nodes(b: _Body, scores, q, v, mask, decode: bool):
    """Nodes for softmax(scores + mask) @ v (ops.masked_softmax_attention): scores (B, Hq, S, T)
    fp32, scaled, v (B, Hkv, T, Dv); `decode`: see `_times_values`. The causal part is
    data flow on the `is_causal` attribute (a function body cannot branch on an attribute):
    allowed = mask and (tril or not is_causal), SDPA's top-left convention."""
    sizes = b.shape(scores, 2, 4)  # (S, T)
    lower = b.op("Cast", b.op("Trilu", b.op("ConstantOfShape", sizes, value=_one()), upper=0), to=_BOOL)
    not_causal = b.op("Not", b.op("Cast", b.attribute("is_causal"), to=_BOOL))
    allowed = b.op("And", mask, b.op("Or", lower, not_causal))
    bias = b.op("Where", allowed, b.op("Constant", value_float=0.0), b.op("Constant", value_float=float("-inf")))
    probs = b.op("CastLike", b.op("Softmax", b.op("Add", scores, bias), axis=-1), v)
    # the query heads of a KV head as rows of one product, reading V once: (B, Hkv, r·S, T) @ (B, Hkv, T, Dv)
    grouped = b.op("Reshape", probs, b.op("Concat", b.shape(v, 0, 2), b.ints(-1), b.shape(scores, 3, 4), axis=0))
    out = _times_values(b, grouped, v, decode)
    return b.op("Reshape", out, b.op("Concat", b.shape(q, 0, 3), b.ints(-1), axis=0))


def _times_values(b: _Body, probs, v, decode: bool):
    """probs (B, G, R, T) @ v (B, G, T, Dv): (B, G, R, Dv).

    onnxruntime's CPU GEMM (MLAS) copies its right operand into packed panels unless the left one
    has a single row, where it streams it (a GEMV kernel). So the `decode` (R = r·S, the few query
    rows of a KV head) takes each row as its own product over the broadcast V,
    (B, G, R, 1, T) @ (B, G, 1, T, Dv), streaming V from memory at 16-24 GB/s where one product of
    R = 3 rows packs it at 13-15 (SmolLM2's shapes at 2K-8K keys, one thread). The prefill's many
    rows keep the GEMM, which packs V once for all of them."""
    if not decode:
        return b.op("MatMul", probs, v)
    rows = b.op("MatMul", b.op("Unsqueeze", probs, b.ints(3)), b.op("Unsqueeze", v, b.ints(2)))  # (B, G, R, 1, Dv)
    return b.op("Squeeze", rows, b.ints(3))


def _by_kv_head(b: _Body, q, v):
    """q (B, Hq, S, D) as fp32 (B, Hkv, r·S, D) times `scale`: the S queries of the r heads of each
    KV head (head i under KV head i // r) as the rows of one matrix, so that scoring them reads each
    key once (one product per KV head, not r over a broadcast key). The scale goes on the queries,
    r·S·D numbers, rather than on the r·S·T scores."""
    rows = b.op("Reshape", b.op("Cast", q, to=_FLOAT), b.op("Concat", b.shape(v, 0, 2), b.ints(-1), b.shape(q, 3), axis=0))
    return b.op("Mul", rows, b.attribute("scale"))


def _scores(b: _Body, queries, k, decode: bool):
    """queries (B, G, R, w) fp32 scored on keys k (B, G, T, w): (B, G, R, T) fp32.

    onnxruntime's CPU GEMM (MLAS) streams its left operand and copies its right one into packed
    panels. So the `decode` (R = r·S, a few query rows against the whole cache) computes
    (k @ queries^T)^T: the keys on the left, the query rows (transposed, which it folds into the
    product) on the right, and only the (R, T) scores transposed back: 24 GB/s over SmolLM2's keys
    at 8K against 16 for queries @ k^T (one thread). The prefill's many rows keep queries @ k^T,
    which packs the keys once for all of them."""
    keys = b.op("Cast", k, to=_FLOAT)
    if not decode:
        return b.op("MatMul", queries, b.op("Transpose", keys, perm=[0, 1, 3, 2]))  # folded into the product
    keys_first = b.op("MatMul", keys, b.op("Transpose", queries, perm=[0, 1, 3, 2]))
    return b.op("Transpose", keys_first, perm=[0, 1, 3, 2])


def _by_query_head(b: _Body, scores, q):
    """(B, Hkv, r·S, T) scores as (B, Hq, S, T)."""
    return b.op("Reshape", scores, b.op("Concat", b.shape(q, 0, 3), b.ints(-1), axis=0))


def _zero():
    import onnx_ir as ir

    return ir.tensor(np.zeros(1, np.float32))


def _minus_inf():
    import onnx_ir as ir

    return ir.tensor(np.full(1, float("-inf"), np.float32))


def _one():
    import onnx_ir as ir

    return ir.tensor(np.ones(1, np.float32))


# --------------------------------------------------------------------------------------------
# the ops: translation and function of each


# kvcompile::attention


def _emit_attention(q, k, v, mask, scale, is_causal, lengths=None, window=0):
    if lengths is not None:
        return _record_kvcompile("attention", [q, k, v, lengths], _attention_attrs(scale, is_causal, window),
                                 overload=_lengths_overload(window))
    return _record_kvcompile("attention", [q, k, v, _bool_mask(mask)], _attention_attrs(scale, is_causal))


def _attention_function(node):
    suffixes = node.overload.split("_")
    by_lengths = LENGTHS in suffixes
    b = _Body(["q", "k", "v", "lengths" if by_lengths else "mask"])
    q, k, v, mask = b.inputs
    if by_lengths:
        mask = _lengths_mask(b, mask, b.shape(q, 2, 3), b.shape(k, 2, 3), ring=RING in suffixes)
    scores = _scores(b, _by_kv_head(b, q, v), k, decode=by_lengths)
    out = _masked_softmax_attention_nodes(b, _by_query_head(b, scores, q), q, v, mask, decode=by_lengths)
    return b.function("attention", out, attributes=_attention_attr_names(suffixes), overload=node.overload)


def _lengths_overload(window: int) -> str:
    return f"{LENGTHS}_{RING}" if window else LENGTHS


def _attention_attr_names(suffixes: Sequence[str]) -> tuple[str, ...]:
    return ("scale", "is_causal", "window") if RING in suffixes else ("scale", "is_causal")


def _lengths_mask(b: _Body, lengths, s, t, ring: bool):
    """The mask of an attention by per-row lengths over T slots: a ring's (`window` attribute) or
    the plain prefix's."""
    return _ring_mask_nodes(b, lengths, s, t) if ring else _length_mask_nodes(b, lengths, s, t)


# kvcompile::pruned_attention


def _groups_overload(count: int, by_lengths: bool = False, window: int = 0) -> str:
    return f"groups{count}" + (f"_{_lengths_overload(window)}" if by_lengths else "")


def _emit_pruned_attention(q, k_groups, heads, channels, v, mask, scale, is_causal, lengths=None, window=0):
    count = len(k_groups)
    last = _bool_mask(mask) if lengths is None else lengths
    return _record_kvcompile("pruned_attention", [q, *k_groups, *heads, *channels, v, last],
                             _attention_attrs(scale, is_causal, window),
                             overload=_groups_overload(count, lengths is not None, window))


def _pruned_attention_function(node):
    """Scores per width group on the group's kept channels, stacked with one block of zeros and
    gathered into KV-head order, (B, Hkv, r·S, T): a KV head in no group reads the zeros
    (uniform attention), as in the reference. The gather index is built on the Hkv head ids alone,
    so no per-score index tensor is materialized."""
    count = (len(node.inputs) - 3) // 3  # q, count × (k, heads, channels), v, mask or lengths
    suffixes = node.overload.split("_")
    by_lengths = LENGTHS in suffixes
    b = _Body(["q", *_group_input_names(count), "v", "lengths" if by_lengths else "mask"])
    q, v, mask = b.inputs[0], b.inputs[-2], b.inputs[-1]
    keys, heads, channels = (b.inputs[1 + i * count : 1 + (i + 1) * count] for i in range(3))
    if by_lengths:
        mask = _lengths_mask(b, mask, b.shape(q, 2, 3), b.shape(v, 2, 3), ring=RING in suffixes)
    q5 = _by_kv_head(b, q, v)
    # a KV head in no group scores 0 everywhere: uniform attention, as in the reference
    scores = _group_scores_by_kv_head(b, q5, keys, heads, channels, b.shape(v, 1, 2), b.shape(v, 2, 3), _zero(),
                                      ordered=ORDERED in suffixes, decode=by_lengths)
    out = _masked_softmax_attention_nodes(b, _by_query_head(b, scores, q), q, v, mask, decode=by_lengths)
    return b.function("pruned_attention", out, attributes=_attention_attr_names(suffixes), overload=node.overload)


def _group_input_names(count: int) -> list[str]:
    """Input names of `count` width groups, in the ops' flattened order: keys, heads, channels."""
    return [*(f"k_{g}" for g in range(count)), *(f"heads_{g}" for g in range(count)),
            *(f"channels_{g}" for g in range(count))]


def _group_scores_by_kv_head(b: _Body, q5, keys, heads, channels, num_kv_heads, length, fill, ordered: bool,
                             decode: bool):
    """Scores per width group on the group's kept channels, stacked with one block of `fill` and
    gathered into KV-head order, (B, Hkv, r·S, T): a KV head in no group reads the fill. The
    gather index is built on the Hkv head ids alone, so no per-score index tensor is materialized.
    `ordered` (the groups' heads are 0, 1, ... in order): the stacked scores are that order.
    `decode`: see `_scores`."""
    blocks = []
    for k, group_heads, group_channels in zip(keys, heads, channels):
        q_group = b.op("Gather", q5, group_heads, axis=1)  # (B, G, r·S, D)
        index = b.op("Expand", b.op("Unsqueeze", group_channels, b.ints(0, 2)),
                     b.op("Concat", b.shape(q_group, 0, 3), b.shape(group_channels, 1, 2), axis=0))
        q_group = b.op("GatherElements", q_group, index, axis=3)  # (B, G, r·S, w)
        blocks.append(_scores(b, q_group, k, decode))  # (B, G, r·S, T)
    if ordered:
        return blocks[0] if len(blocks) == 1 else b.op("Concat", *blocks, axis=1)
    fill_shape = b.op("Concat", b.shape(q5, 0, 1), b.ints(1), b.shape(q5, 2, 3), length, axis=0)
    blocks.append(b.op("ConstantOfShape", fill_shape, value=fill))
    scores = b.op("Concat", *blocks, axis=1)  # (B, G_0 + ... + 1, r·S, T)
    if not heads:
        return b.op("Expand", scores, b.op("Concat", b.shape(q5, 0, 1), num_kv_heads, b.shape(q5, 2, 3), length, axis=0))
    return b.op("Gather", scores, _slots_among(b, b.op("Concat", *heads, axis=0), num_kv_heads), axis=1)


def _slots_among(b: _Body, listed, num_heads):
    """(Hkv,) int64: each KV head's place in `listed` (distinct head ids), len(listed) where absent."""
    count = b.op("Shape", listed)
    slots = b.op("Expand", count, num_heads)
    places = b.op("Range", b.op("Constant", value_int=0), b.op("Squeeze", count), b.op("Constant", value_int=1))
    return b.op("ScatterElements", slots, listed, places, axis=0)


def _length_mask_nodes(b: _Body, lengths, s, t):
    """ops._length_mask as nodes: (B, 1, S, T) bool, the S queries the last S of row b's lengths[b]
    keys, query i seeing slots j <= lengths[b] - S + i. `s`, `t`: (1,) int64 sizes."""
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    steps = b.op("Range", zero, b.op("Squeeze", s), one)  # (S,)
    last_seen = b.op("Add", b.op("Sub", b.op("Unsqueeze", lengths, b.ints(1)), s), steps)  # (B, S)
    slots = b.op("Range", zero, b.op("Squeeze", t), one)  # (T,)
    seen = b.op("LessOrEqual", slots, b.op("Unsqueeze", last_seen, b.ints(2)))  # (B, S, T)
    return b.op("Unsqueeze", seen, b.ints(1))


def _ring_mask_nodes(b: _Body, lengths, s, capacity):
    """ops._ring_view's mask as nodes: (B, 1, S, C) bool over a ring of C slots holding token t of
    row b in slot t % C, its tokens those before lengths[b]: slot j holds the latest such token,
    lengths[b] - 1 - ((lengths[b] - 1 - j) mod C) (none where negative), and query i (token
    lengths[b] - S + i) sees the tokens in (its - window, its]. `s`, `capacity`: (1,) int64 sizes."""
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    last = b.op("Sub", b.op("Unsqueeze", lengths, b.ints(1)), one)  # (B, 1)
    slots = b.op("Range", zero, b.op("Squeeze", capacity), one)  # (C,)
    token = b.op("Sub", last, b.op("Mod", b.op("Sub", last, slots), capacity))  # (B, C), Mod of ints: Python's sign
    query = b.op("Add", b.op("Sub", last, b.op("Sub", s, one)), b.op("Range", zero, b.op("Squeeze", s), one))  # (B, S)
    token, query = b.op("Unsqueeze", token, b.ints(1)), b.op("Unsqueeze", query, b.ints(2))  # (B, 1, C), (B, S, 1)
    held = b.op("GreaterOrEqual", token, zero)
    seen = b.op("And", b.op("LessOrEqual", token, query), b.op("Greater", token, b.op("Sub", query, b.attribute("window"))))
    return b.op("Unsqueeze", b.op("And", held, seen), b.ints(1))


# kvcompile::windowed_attention


def _emit_windowed_attention(q, k_window, v_window, k_middle, heads, channels, v_middle, mask, scale, is_causal, sink,
                             window_lengths=None, middle_lengths=None, window_start=None):
    if window_lengths is None or window_start is not None:
        raise TranslationError("kvcompile::windowed_attention is exported in its per-row lengths form only (the "
                               "runtime's decode, window shifted by the cache): got a mask or a ring window_start")
    count = len(k_middle)
    return _record_kvcompile(
        "windowed_attention", [q, k_window, v_window, *k_middle, *heads, *channels, v_middle, window_lengths,
                               middle_lengths],
        _attention_attrs(scale, is_causal), overload=_groups_overload(count, by_lengths=True),
    )  # fmt: skip


def _windowed_attention_function(node):
    """One softmax over [middle, window] (ops.windowed_attention_reference with lengths, whose
    split-KV partials combine to the same): window keys score on every channel, middle keys per
    width group on the kept ones, streaming heads (in no group) score -inf on the middle; middle
    probabilities then meet V for the heads the middle keeps V of (groups' heads, ascending)."""
    count = (len(node.inputs) - 6) // 3  # q, k_window, v_window, count × (k, heads, channels), v_middle, 2 lengths
    b = _Body(["q", "k_window", "v_window", *_group_input_names(count), "v_middle", "window_lengths",
               "middle_lengths"])
    q, k_window, v_window = b.inputs[:3]
    v_middle, window_lengths, middle_lengths = b.inputs[-3:]
    keys, heads, channels = (b.inputs[3 + i * count : 3 + (i + 1) * count] for i in range(3))
    num_kv_heads, window, middle, s = b.shape(v_window, 1, 2), b.shape(v_window, 2, 3), b.shape(v_middle, 2, 3), b.shape(q, 2, 3)
    ordered = ORDERED in node.overload.split("_")
    q5 = _by_kv_head(b, q, v_window)
    scores = _scores(b, q5, k_window, decode=True)  # (B, Hkv, r·S, Tw)
    mask = _length_mask_nodes(b, window_lengths, s, window)  # (B, 1, S, Tw)
    if count:
        middle_scores = _group_scores_by_kv_head(b, q5, keys, heads, channels, num_kv_heads, middle, _minus_inf(),
                                                 ordered, decode=True)
        scores = b.op("Concat", middle_scores, scores, axis=-1)  # (B, Hkv, r·S, M + Tw)
        middle_mask = b.op("Expand", _length_mask_nodes(b, middle_lengths, b.ints(1), middle),
                           b.op("Concat", b.shape(q, 0, 1), b.ints(1), s, middle, axis=0))  # every query sees the middle
        mask = b.op("Concat", middle_mask, mask, axis=-1)
    bias = b.op("Where", mask, b.op("Constant", value_float=0.0), b.op("Constant", value_float=float("-inf")))
    probs = b.op("Softmax", b.op("Add", _by_query_head(b, scores, q), bias), axis=-1)  # (B, Hq, S, M + Tw)
    probs = b.op("Reshape", probs, b.op("Concat", b.shape(v_window, 0, 2), b.ints(-1), b.shape(probs, 3, 4), axis=0))
    out = _times_values(b, b.op("Slice", probs, middle if count else b.ints(0), b.ints(2**62), b.ints(-1)),
                        b.op("Cast", v_window, to=_FLOAT), decode=True)  # (B, Hkv, r·S, Dv)
    if count and ordered:  # v_middle keeps every KV head, in order
        middle_probs = b.op("Slice", probs, b.ints(0), middle, b.ints(-1))
        out = b.op("Add", out, _times_values(b, middle_probs, b.op("Cast", v_middle, to=_FLOAT), decode=True))
    elif count:
        listed = b.op("Concat", *heads, axis=0)
        value_heads, _ = b.op("TopK", listed, b.op("Shape", listed), largest=0, num_outputs=2)  # ascending: v_middle's
        middle_probs = b.op("Gather", b.op("Slice", probs, b.ints(0), middle, b.ints(-1)), value_heads, axis=1)
        middle_out = _times_values(b, middle_probs, b.op("Cast", v_middle, to=_FLOAT), decode=True)  # (B, Hm, r·S, Dv)
        zeros = b.op("ConstantOfShape", b.op("Concat", b.shape(q5, 0, 1), b.ints(1), b.shape(q5, 2, 3),
                                             b.shape(v_middle, 3, 4), axis=0), value=_zero())
        middle_out = b.op("Gather", b.op("Concat", middle_out, zeros, axis=1), _slots_among(b, value_heads, num_kv_heads),
                          axis=1)  # (B, Hkv, r·S, Dv), 0 for streaming heads
        out = b.op("Add", out, middle_out)
    out = b.op("Reshape", out, b.op("Concat", b.shape(q, 0, 3), b.ints(-1), axis=0))
    return b.function("windowed_attention", b.op("CastLike", out, v_window), attributes=("scale", "is_causal"),
                      overload=node.overload)


# kvcompile::gather_kv_channels


def _emit_gather_kv_channels(x, heads, channels):
    return _record_kvcompile("gather_kv_channels", [x, heads, channels], {})


def _gather_kv_channels_function(node):
    b = _Body(["x", "heads", "channels"])
    x, heads, channels = b.inputs
    picked = b.op("Gather", x, heads, axis=1)  # (B, G, T, D)
    index = b.op("Expand", b.op("Unsqueeze", channels, b.ints(0, 2)),
                 b.op("Concat", b.shape(picked, 0, 3), b.shape(channels, 1, 2), axis=0))
    return b.function("gather_kv_channels", b.op("GatherElements", picked, index, axis=3))


# kvcompile::merge_heads


def _emit_merge_heads(x, groups, down):
    return _record_kvcompile("merge_heads", [x, groups, down], {})


def _merge_heads_function(node):
    b = _Body(["x", "groups", "down"])
    x, groups, down = b.inputs
    grouped = b.op("Gather", x, b.op("Reshape", groups, b.ints(-1)), axis=1)  # (B, G*t, S, d)
    grouped = b.op("Reshape", grouped, b.op("Concat", b.shape(x, 0, 1), b.op("Shape", groups), b.shape(x, 2, 4), axis=0))
    per_token = b.op("Transpose", grouped, perm=[0, 1, 3, 2, 4])  # (B, G, S, t, d)
    flat = b.op("Reshape", per_token, b.op("Concat", b.shape(x, 0, 1), b.shape(groups, 0, 1), b.shape(x, 2, 3),
                                           b.ints(-1), axis=0))  # (B, G, S, t*d)
    return b.function("merge_heads", b.op("MatMul", flat, down))


# kvcompile::project_heads


def _emit_project_heads(x, heads, weight):
    return _record_kvcompile("project_heads", [x, heads, weight], {})


def _project_heads_function(node):
    b = _Body(["x", "heads", "weight"])
    x, heads, weight = b.inputs
    return b.function("project_heads", b.op("MatMul", b.op("Gather", x, heads, axis=1), weight))


def _groups_in_kv_head_order(node) -> bool:
    """Whether a pruned or windowed attention node's groups' head lists, concatenated, are the KV
    heads 0, 1, ..., Hkv - 1 (lists that are initializers, and a static number of KV heads)."""
    if node.op_type == "pruned_attention":
        count, first, v = (len(node.inputs) - 3) // 3, 1, node.inputs[-2]  # q, groups, v, mask
    elif node.op_type == "windowed_attention":
        count, first, v = (len(node.inputs) - 6) // 3, 3, node.inputs[2]  # q, k_window, v_window, groups, ...
    else:
        return False
    heads = node.inputs[first + count : first + 2 * count]
    if not heads or any(h.const_value is None for h in heads) or v.shape is None or not isinstance(v.shape[1], int):
        return False
    listed = [int(head) for h in heads for head in h.const_value.numpy().reshape(-1)]
    return listed == list(range(v.shape[1]))


# --------------------------------------------------------------------------------------------
# the table


TRANSLATIONS: dict[str, Translation] = {
    "attention": Translation(_emit_attention, _attention_function),
    "gather_kv_channels": Translation(_emit_gather_kv_channels, _gather_kv_channels_function),
    "pruned_attention": Translation(_emit_pruned_attention, _pruned_attention_function),
    "windowed_attention": Translation(_emit_windowed_attention, _windowed_attention_function),
    "merge_heads": Translation(_emit_merge_heads, _merge_heads_function),
    "project_heads": Translation(_emit_project_heads, _project_heads_function),
}
# The kvcompile ops the export translates: a live view of the table's names, so it is the table.
SUPPORTED_OPS = TRANSLATIONS.keys()


def _emit_remainder(x, divisor):
    """aten.remainder.Scalar, whose divisor may be a symbolic scalar (the decode's ring slots,
    `cache_slots % C`, C the buffer's dynamic size), which the exporter's own translation does not
    take. Python's sign: integers by ONNX's Mod (fmod=0 follows the divisor's sign), floats as
    x - floor(x / d) * d."""
    import onnx_ir as ir

    if not isinstance(divisor, ir.Value):
        divisor = _record("", "Constant", [], {"value": ir.tensor(np.array(divisor, dtype=x.dtype.numpy()))})[0]
    divisor = _record("", "CastLike", [divisor, x])[0]
    if not x.dtype.is_floating_point():
        return _record("", "Mod", [x, divisor])[0]
    quotient = _record("", "Floor", [_record("", "Div", [x, divisor])[0]])[0]
    return _record("", "Sub", [x, _record("", "Mul", [quotient, divisor])[0]])[0]


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """`torch.onnx.export(custom_translation_table=...)`: each supported op's translation, and the
    remainder by a symbolic size of the decode's ring slots."""
    table = {getattr(torch.ops.kvcompile, name).default: translation.emit for name, translation in TRANSLATIONS.items()}
    return {**table, torch.ops.aten.remainder.Scalar: _emit_remainder}


def add_functions(model) -> None:
    """Give an exported `onnx_ir.Model` the FUNCTION of each (op, overload) its `ai.kvcompile`
    nodes call, and the import of the domain. Call it after torch.onnx.export
    returns: the exporter's opset conversion and optimizer inline every model-local function they
    see (run the optimizer afterwards with `inline=False`). Grouped attention nodes whose head lists
    (the plan's constants, initializers by now) are the KV heads in order get the `ordered` overload."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != DOMAIN:
            continue
        if _groups_in_kv_head_order(node):
            node.overload = f"{node.overload}_{ORDERED}"
        if (DOMAIN, node.op_type, node.overload) in model.functions:
            continue
        function = TRANSLATIONS[node.op_type].function(node)
        function.opset_imports[""] = model.opset_imports[""]
        model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
