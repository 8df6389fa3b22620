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
- **Nodes are emitted through the exporter's recorder** (`onnxscript.evaluator.default()`, which
  the exporter sets while it runs a translation): an onnxscript `@script` function cannot be
  variadic, and this keeps one code path for all ops.
- **`attention_with_cache` has no function**: it becomes onnxruntime's
  `com.microsoft.GroupQueryAttention`, which appends to the cache itself.

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
# onnxruntime's contrib ops (GroupQueryAttention)
MS_DOMAIN = "com.microsoft"

_FLOAT, _BOOL = 1, 9  # onnx.TensorProto.FLOAT, BOOL


class TranslationError(RuntimeError):
    """A kvcompile op's arguments have no ONNX translation (or a translation ran outside an export)."""


@dataclass(frozen=True)
class Translation:
    """One op's ONNX face. `emit`: the translation torch.onnx.export calls with the op's
    arguments, recording its node(s). `function`: the model-local FUNCTION of the `ai.kvcompile`
    node `emit` records (given that node, for its arity); None where the node is a runtime's own op."""

    emit: Callable
    function: Callable | None


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


def _attention_attrs(scale: float, is_causal: bool) -> dict:
    return {"scale": float(scale), "is_causal": int(bool(is_causal))}  # ONNX has no bool attribute


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

    def op(self, op_type: str, *inputs, **attributes):
        ir = self.ir
        attrs = [value if isinstance(value, ir.Attr) else ir.convenience.convert_attribute(name, value)
                 for name, value in attributes.items()]
        node = ir.Node("", op_type, list(inputs), attributes=attrs, num_outputs=1)
        self.nodes.append(node)
        return node.outputs[0]

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


def _masked_softmax_attention_nodes(b: _Body, scores, q, v, mask):
    """Nodes for softmax(scores + mask) @ v (ops.masked_softmax_attention): scores (B, Hq, S, T)
    fp32 already scaled, v (B, Hkv, T, Dv). The causal part is data flow on the `is_causal`
    attribute (a function body cannot branch on an attribute): allowed = mask and (tril or not
    is_causal), SDPA's top-left convention."""
    sizes = b.shape(scores, 2, 4)  # (S, T)
    lower = b.op("Cast", b.op("Trilu", b.op("ConstantOfShape", sizes, value=_one()), upper=0), to=_BOOL)
    not_causal = b.op("Not", b.op("Cast", b.attribute("is_causal"), to=_BOOL))
    allowed = b.op("And", mask, b.op("Or", lower, not_causal))
    bias = b.op("Where", allowed, b.op("Constant", value_float=0.0), b.op("Constant", value_float=float("-inf")))
    probs = b.op("CastLike", b.op("Softmax", b.op("Add", scores, bias), axis=-1), v)
    # group the query heads by KV head instead of repeating V: (B, Hkv, r, S, T) @ (B, Hkv, 1, T, Dv)
    grouped = b.op("Reshape", probs, b.op("Concat", b.shape(v, 0, 2), b.ints(-1), sizes, axis=0))
    out = b.op("MatMul", grouped, b.op("Unsqueeze", v, b.ints(2)))
    return b.op("Reshape", out, b.op("Concat", b.shape(q, 0, 3), b.ints(-1), axis=0))


def _by_kv_head(b: _Body, q, v):
    """q (B, Hq, S, D) as fp32 (B, Hkv, r, S, D), query head i under KV head i // r."""
    return b.op("Reshape", b.op("Cast", q, to=_FLOAT), b.op("Concat", b.shape(v, 0, 2), b.ints(-1), b.shape(q, 2), axis=0))


def _keys_transposed(b: _Body, k):
    """k (B, G, T, w) as fp32 (B, G, 1, w, T), to score every query head of a KV head at once."""
    return b.op("Transpose", b.op("Unsqueeze", b.op("Cast", k, to=_FLOAT), b.ints(2)), perm=[0, 1, 2, 4, 3])


def _scaled(b: _Body, scores5, q):
    """(B, Hkv, r, S, T) scores times `scale`, as (B, Hq, S, T)."""
    scale = b.attribute("scale")
    flat = b.op("Reshape", scores5, b.op("Concat", b.shape(q, 0, 3), b.ints(-1), axis=0))
    return b.op("Mul", flat, scale)


def _zero():
    import onnx_ir as ir

    return ir.tensor(np.zeros(1, np.float32))


def _one():
    import onnx_ir as ir

    return ir.tensor(np.ones(1, np.float32))


# --------------------------------------------------------------------------------------------
# the ops: translation and function of each


# kvcompile::attention


def _emit_attention(q, k, v, mask, scale, is_causal):
    return _record_kvcompile("attention", [q, k, v, _bool_mask(mask)], _attention_attrs(scale, is_causal))


def _attention_function(node):
    b = _Body(["q", "k", "v", "mask"])
    q, k, v, mask = b.inputs
    scores = b.op("MatMul", _by_kv_head(b, q, v), _keys_transposed(b, k))
    out = _masked_softmax_attention_nodes(b, _scaled(b, scores, q), q, v, mask)
    return b.function("attention", out, attributes=("scale", "is_causal"))


# kvcompile::pruned_attention


def _groups_overload(count: int) -> str:
    return f"groups{count}"


def _emit_pruned_attention(q, k_groups, heads, channels, v, mask, scale, is_causal):
    count = len(k_groups)
    return _record_kvcompile("pruned_attention", [q, *k_groups, *heads, *channels, v, _bool_mask(mask)],
                             _attention_attrs(scale, is_causal), overload=_groups_overload(count))


def _pruned_attention_function(node):
    """Scores per width group on the group's kept channels, stacked with one block of zeros and
    gathered into KV-head order, (B, Hkv, r, S, T): a KV head in no group reads the zeros
    (uniform attention), as in the reference. The gather index is built on the Hkv head ids alone,
    so no per-score index tensor is materialized."""
    count = (len(node.inputs) - 3) // 3  # q, count × (k, heads, channels), v, mask
    names = ["q", *(f"k_{g}" for g in range(count)), *(f"heads_{g}" for g in range(count)),
             *(f"channels_{g}" for g in range(count)), "v", "mask"]
    b = _Body(names)
    q, v, mask = b.inputs[0], b.inputs[-2], b.inputs[-1]
    keys, heads, channels = (b.inputs[1 + i * count : 1 + (i + 1) * count] for i in range(3))
    q5 = _by_kv_head(b, q, v)
    blocks = []
    for k, group_heads, group_channels in zip(keys, heads, channels):
        q_group = b.op("Gather", q5, group_heads, axis=1)  # (B, G, r, S, D)
        index = b.op("Expand", b.op("Unsqueeze", group_channels, b.ints(0, 2, 3)),
                     b.op("Concat", b.shape(q_group, 0, 4), b.shape(group_channels, 1, 2), axis=0))
        q_group = b.op("GatherElements", q_group, index, axis=4)  # (B, G, r, S, w)
        blocks.append(b.op("MatMul", q_group, _keys_transposed(b, k)))  # (B, G, r, S, T)
    zeros_shape = b.op("Concat", b.shape(q5, 0, 1), b.ints(1), b.shape(q5, 2, 4), b.shape(v, 2, 3), axis=0)
    blocks.append(b.op("ConstantOfShape", zeros_shape, value=_zero()))
    scores = b.op("Concat", *blocks, axis=1)  # (B, G_0 + ... + 1, r, S, T)
    if count:
        # slot of each KV head in `scores`: its place among the groups' heads, else the zeros block
        grouped = b.op("Concat", *heads, axis=0)
        num_grouped = b.op("Shape", grouped)
        slots = b.op("Expand", num_grouped, b.shape(v, 1, 2))
        places = b.op("Range", b.op("Constant", value_int=0), b.op("Squeeze", num_grouped), b.op("Constant", value_int=1))
        scores = b.op("Gather", scores, b.op("ScatterElements", slots, grouped, places, axis=0), axis=1)
    else:
        scores = b.op("Expand", scores, b.op("Concat", b.shape(q5, 0, 1), b.shape(v, 1, 2), b.shape(q5, 2, 4),
                                             b.shape(v, 2, 3), axis=0))
    out = _masked_softmax_attention_nodes(b, _scaled(b, scores, q), q, v, mask)
    return b.function("pruned_attention", out, attributes=("scale", "is_causal"), overload=_groups_overload(count))


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


# kvcompile::attention_with_cache


def _emit_attention_with_cache(q, past_k, past_v, new_k, new_v, scale: float):
    """onnxruntime's GroupQueryAttention: tokens in (B, S, H·D) layout, the cache in
    (B, Hkv, T, D); `seqlens_k` is each row's total length - 1 (no padding)."""
    import onnx_ir as ir

    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[3], new_k.shape[1]
    if not all(isinstance(size, int) for size in (num_heads, head_dim, num_kv_heads)):
        raise TranslationError(
            f"GroupQueryAttention needs static head counts and head_dim, got q {q.shape}, k {new_k.shape}"
        )

    def constant(values, dtype=np.int64):
        return _record("", "Constant", [], {"value": ir.tensor(np.asarray(values, dtype=dtype))})[0]

    def tokens_major(x):  # (B, H, S, D) -> (B, S, H·D)
        x = _record("", "Transpose", [x], {"perm": [0, 2, 1, 3]})[0]
        return _record("", "Reshape", [x, constant([0, 0, -1])])[0]

    def length(x):
        return _record("", "Shape", [x], {"start": 2, "end": 3})[0]

    total = _record("", "Add", [length(past_k), length(new_k)])[0]  # (1,) int64
    batch = _record("", "Shape", [q], {"start": 0, "end": 1})[0]
    seqlens_k = _record("", "Expand", [_record("", "Sub", [total, constant([1])])[0], batch])[0]
    seqlens_k = _record("", "Cast", [seqlens_k], {"to": ir.DataType.INT32})[0]
    total = _record("", "Cast", [_record("", "Reshape", [total, constant([], np.int64)])[0]], {"to": ir.DataType.INT32})[0]
    out, present_k, present_v = _record(
        MS_DOMAIN, "GroupQueryAttention",
        [tokens_major(q), tokens_major(new_k), tokens_major(new_v), past_k, past_v, seqlens_k, total],
        {"num_heads": num_heads, "kv_num_heads": num_kv_heads, "scale": float(scale)},
        num_outputs=3,
    )  # fmt: skip
    out = _record("", "Reshape", [out, constant([0, 0, num_heads, head_dim])])[0]
    return _record("", "Transpose", [out], {"perm": [0, 2, 1, 3]})[0], present_k, present_v


# --------------------------------------------------------------------------------------------
# the table


TRANSLATIONS: dict[str, Translation] = {
    "attention": Translation(_emit_attention, _attention_function),
    "attention_with_cache": Translation(_emit_attention_with_cache, None),
    "gather_kv_channels": Translation(_emit_gather_kv_channels, _gather_kv_channels_function),
    "pruned_attention": Translation(_emit_pruned_attention, _pruned_attention_function),
    "merge_heads": Translation(_emit_merge_heads, _merge_heads_function),
    "project_heads": Translation(_emit_project_heads, _project_heads_function),
}
# The kvcompile ops the export translates: a live view of the table's names, so it is the table.
SUPPORTED_OPS = TRANSLATIONS.keys()


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """`torch.onnx.export(custom_translation_table=...)`: each supported op's translation."""
    return {getattr(torch.ops.kvcompile, name).default: translation.emit for name, translation in TRANSLATIONS.items()}


def add_functions(model) -> None:
    """Give an exported `onnx_ir.Model` the FUNCTION of each (op, overload) its `ai.kvcompile`
    nodes call, and the imports of the domains its nodes use. Call it after torch.onnx.export
    returns: the exporter's opset conversion and optimizer inline every model-local function they
    see (run the optimizer afterwards with `inline=False`)."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == MS_DOMAIN:
            model.opset_imports[MS_DOMAIN] = 1
        if node.domain != DOMAIN or (DOMAIN, node.op_type, node.overload) in model.functions:
            continue
        function = TRANSLATIONS[node.op_type].function(node)
        function.opset_imports[""] = model.opset_imports[""]
        model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
