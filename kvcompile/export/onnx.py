"""ONNX export of a transformed model, and a greedy onnxruntime loop that runs it.

`export_onnx(model, plan, folder)` writes `prefill.onnx`, `decode.onnx` and `manifest.json`;
`generate(folder, input_ids)` decodes greedily with stock onnxruntime, no kvcompile and no plugin.

Design, and why:

- **The programs are re-exported, not the model.** `transform` already produced two ATen FX
  programs with an explicit cache (`past_X` in, `present_X` out, see capture.py). Re-exporting
  them with `torch.onnx.export(dynamo=True)` keeps that calling convention verbatim, so the ONNX
  loop is the runtime's loop: feed every `present_X` back as `past_X`. Batch, sequence and past
  length stay dynamic (`dynamic_shapes`). The prefill reads no past, so its ONNX file takes only
  `input_ids` and `position_ids`: the empty pasts are made inside the graph.
- **Every `kvcompile::` op stays one node** of domain `ai.kvcompile` (opset 1) with its scalar
  arguments as attributes (`scale`, `is_causal`), and a model-local FUNCTION in standard ONNX ops
  says what it computes. A runtime with a fused kernel can claim the node; stock onnxruntime
  inlines the function. The bodies follow the reference implementations in kernels/ops.py
  (scores and softmax in fp32, as they are).
- **Variadic arguments become overloads.** `pruned_attention` takes one key tensor, head list and
  channel table per width group, and ONNX functions have fixed inputs. The number of groups is
  static per layer, so each arity gets its own function, told apart by the ONNX `overload` field
  (`groups2`, ...): every node keeps the op's name, inputs in the op's flattened order
  (q, k_0.., heads_0.., channels_0.., v, mask).
- **Nodes are emitted through the exporter's recorder** (`onnxscript.evaluator.default()`, which
  the exporter sets while it runs a translation): an onnxscript `@script` function cannot be
  variadic, and this keeps one code path for all ops. The functions are added to the model only
  after `torch.onnx.export` returns, and its optimizer runs afterwards with `inline=False`: the
  exporter's opset conversion and optimizer inline every model-local function they see.
- **`gqa=True` hands attention to onnxruntime.** Where a plan leaves plain GQA attention, the
  `fuse_cache_update` pass turns each site's cache concats and attention into one
  `kvcompile::attention_with_cache`, translated to `com.microsoft.GroupQueryAttention` (which
  appends to the cache itself); every other plan is refused for it, by field.
- **Windowed plans are refused.** Their runtime moves tokens from the full-channel window to the
  pruned middle between calls (`cache.flush_windows`), which an ONNX loop would have to replicate;
  until it does, exporting one would give a cache the loop cannot maintain. Any `kvcompile::` op
  without a translation is refused by name too: a silent fallback would be a wrong model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import kvcompile.kernels  # noqa: F401  (registers the ops the programs call)

from kvcompile.capture import clone_program, signature_of
from kvcompile.passes import PassManager, fuse_cache_update
from kvcompile.plan import Plan
from kvcompile.runtime import TransformedModel, eos_token_ids, transform

DOMAIN = "ai.kvcompile"
DOMAIN_VERSION = 1
# The function bodies use ops unchanged since opset 18; once exported they import the opset the
# exporter emitted (20 with torch 2.13).
BODY_OPSET = 18
MANIFEST = "manifest.json"
PREFILL, DECODE = "prefill.onnx", "decode.onnx"
# Above this many bytes of parameters the weights go to external data files (protobuf caps at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1.5e9

SUPPORTED_OPS = ("attention", "attention_with_cache", "gather_kv_channels", "pruned_attention", "merge_heads",
                 "project_heads")
# onnxruntime's contrib ops, for the `gqa` option
MS_DOMAIN = "com.microsoft"


class OnnxExportError(RuntimeError):
    """The transformed model cannot be exported to ONNX (names the plan field or the op)."""


# --------------------------------------------------------------------------------------------
# export


def export_onnx(
    model: torch.nn.Module,
    plan: Plan,
    path: str | Path,
    *,
    program: torch.fx.GraphModule | None = None,
    external_data: bool | None = None,
    gqa: bool = False,
) -> Path:
    """Export `kvcompile.transform(model, plan, program=program)` to the folder `path`.

    Writes `prefill.onnx`, `decode.onnx` and `manifest.json` (input and output names in order,
    cache entries, model shape, plan fingerprint, dtype, EOS ids). `external_data`: store the
    weights next to each file; by default only when the parameters exceed 1.5 GB. `gqa`: each
    layer's cache update and attention as one onnxruntime `com.microsoft.GroupQueryAttention` node,
    for plans that leave plain GQA attention (head merges folded into the weights, no K-channel
    pruning). Returns the folder.
    """
    import onnx

    if gqa:
        _check_plain_attention(plan)
    if plan.windowed:
        raise OnnxExportError(
            f"plans with windows (plan.sink={plan.sink}, plan.recent={plan.recent}) are not supported by the ONNX "
            "export yet: their runtime moves tokens between cache regions between calls (cache.flush_windows), "
            "which the ONNX decode loop does not replicate; use plan.with_windows(0, 0) or the PyTorch runtime"
        )
    tm = transform(model, plan, program=program)
    programs = {"prefill": tm.prefill_program, "decode": tm.decode_program}
    if gqa:
        programs = {phase: PassManager([fuse_cache_update])(clone_program(gm)) for phase, gm in programs.items()}
    for phase, gm in programs.items():
        _check_ops(gm, phase)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_THRESHOLD

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    prompt, past = _sample_call(tm)
    prefill = _export_program(_Prefill(tm, programs["prefill"]), _prefill_names(tm), prompt.prefill_args, _prefill_dims())
    decode_args = (*prompt.decode_args, *past.values())
    decode = _export_program(programs["decode"], signature_of(tm.decode_program), decode_args, _decode_dims(len(past)))
    for program_, file in ((prefill, PREFILL), (decode, DECODE)):
        program_.save(folder / file, external_data=external_data)
        onnx.checker.check_model(str(folder / file), full_check=True)

    manifest = {
        "format": 1,
        "prefill": {"file": PREFILL, **dataclasses.asdict(_prefill_names(tm))},
        "decode": {"file": DECODE, **dataclasses.asdict(signature_of(tm.decode_program))},
        "cache_entries": list(past),
        "shape": dataclasses.asdict(tm.shape),
        "plan_fingerprint": plan.fingerprint(),
        "dtype": str(tm.dtype).removeprefix("torch."),
        "eos_token_id": eos_token_ids(None, tm.generation_config),
        "domain": {"name": DOMAIN, "version": DOMAIN_VERSION},
        "attention": "com.microsoft.GroupQueryAttention" if gqa else f"{DOMAIN} functions",
        "opset": prefill.model.opset_imports[""],
        "external_data": external_data,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _check_plain_attention(plan: Plan) -> None:
    reasons = []
    if plan.k_channels:
        reasons.append(f"field k_channels prunes layers {sorted(plan.k_channels)}")
    at_run_time = sorted(layer for layer, merge in plan.merges.items() if merge.rope == "post")
    if at_run_time:
        reasons.append(f"field merges: layers {at_run_time} merge with rope='post' (projections at run time)")
    if reasons:
        raise OnnxExportError(
            "gqa=True needs plain GQA attention in every layer (head merges folded into the weights: rope='commute' "
            "or 'none', no K-channel pruning): " + "; ".join(reasons)
        )


def _check_ops(gm: torch.fx.GraphModule, phase: str) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace == "kvcompile" and node.target._opname not in SUPPORTED_OPS:
            raise OnnxExportError(
                f"the {phase} program calls kvcompile::{node.target._opname}, which has no ONNX translation "
                f"(supported: {', '.join(SUPPORTED_OPS)})"
            )


class _Prefill(torch.nn.Module):
    """The prefill program with its empty pasts made inside, so the ONNX prefill takes only the prompt."""

    def __init__(self, tm: TransformedModel, program: torch.fx.GraphModule):
        super().__init__()
        self.program = program
        self.entries = [name.removeprefix("past_") for name in signature_of(program).inputs[2:]]
        self.empty_past = tm.empty_past  # a bound method, not a submodule: the parameters stay the program's
        self.eval()  # no dropout to speak of, but the exporter warns about training mode

    def forward(self, input_ids, position_ids):
        batch = input_ids.shape[0]
        return self.program(input_ids, position_ids, *(self.empty_past(entry, batch) for entry in self.entries))


def _prefill_names(tm: TransformedModel):
    sig = signature_of(tm.prefill_program)
    return type(sig)(inputs=sig.inputs[:2], outputs=list(sig.outputs))


@dataclasses.dataclass
class _Prompt:
    prefill_args: tuple[torch.Tensor, torch.Tensor]
    decode_args: tuple[torch.Tensor, torch.Tensor]


def _sample_call(tm: TransformedModel) -> tuple[_Prompt, dict[str, torch.Tensor]]:
    """Example inputs: a prompt, and the compressed cache the PyTorch runtime holds after it
    (so the decode's example pasts have exactly the runtime's shapes). Sizes distinct and > 1:
    export specializes sizes 0 and 1."""
    batch, seq, new = 2, 4, 3
    device = tm.device
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    cache = tm(ids, use_cache=True).past_key_values
    decode_ids = torch.zeros(batch, new, dtype=torch.long, device=device)
    prompt = _Prompt(
        prefill_args=(ids, torch.arange(seq, device=device).expand(batch, -1)),
        decode_args=(decode_ids, torch.arange(seq, seq + new, device=device).expand(batch, -1)),
    )
    past = {name.removeprefix("past_"): cache.entries[name.removeprefix("past_")]
            for name in signature_of(tm.decode_program).inputs[2:]}
    return prompt, past


def _prefill_dims():
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    return ({0: batch, 1: seq}, {0: batch, 1: seq})


def _decode_dims(num_pasts: int):
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, *({0: batch, 2: past} for _ in range(num_pasts)))


def _export_program(module: torch.nn.Module, names, args: tuple, dynamic_shapes):
    """torch.onnx.export(dynamo=True) with the kvcompile translations; the exporter's optimizer
    runs afterwards with inlining off, so the ai.kvcompile nodes survive."""
    import onnxscript.optimizer

    functions: dict[tuple, object] = {}
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=list(names.inputs),
            output_names=list(names.outputs),
            custom_translation_table=_translation_table(functions),
            optimize=False,
            verify=False,
            report=False,
            verbose=False,
        )
    model = program.model
    for function in functions.values():
        function.opset_imports[""] = model.opset_imports[""]
        model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    if any(node.domain == MS_DOMAIN for node in model.graph):
        model.opset_imports[MS_DOMAIN] = 1
    onnxscript.optimizer.optimize(model, inline=False)
    return program




# --------------------------------------------------------------------------------------------
# translations: each kvcompile op -> one ai.kvcompile node + its function


def _translation_table(functions: dict) -> dict[Callable, Callable]:
    """The exporter's table; `functions` caches one ir.Function per (op, overload) for this export."""
    ops = torch.ops.kvcompile

    def attention(q, k, v, mask, scale, is_causal):
        return _emit(functions, "attention", [q, k, v, _bool_mask(mask)], _attention_attrs(scale, is_causal),
                     _attention_function)

    def gather_kv_channels(x, heads, channels):
        return _emit(functions, "gather_kv_channels", [x, heads, channels], {}, _gather_function)

    def pruned_attention(q, k_groups, heads, channels, v, mask, scale, is_causal):
        count = len(k_groups)
        return _emit(functions, "pruned_attention", [q, *k_groups, *heads, *channels, v, _bool_mask(mask)],
                     _attention_attrs(scale, is_causal), lambda: _pruned_function(count), overload=f"groups{count}")

    def merge_heads(x, groups, down):
        return _emit(functions, "merge_heads", [x, groups, down], {}, _merge_function)

    def project_heads(x, heads, weight):
        return _emit(functions, "project_heads", [x, heads, weight], {}, _project_function)

    return {
        ops.attention.default: attention,
        ops.attention_with_cache.default: _group_query_attention,
        ops.gather_kv_channels.default: gather_kv_channels,
        ops.pruned_attention.default: pruned_attention,
        ops.merge_heads.default: merge_heads,
        ops.project_heads.default: project_heads,
    }


def _attention_attrs(scale: float, is_causal: bool) -> dict:
    return {"scale": float(scale), "is_causal": int(bool(is_causal))}  # ONNX has no bool attribute


def _record(domain: str, op_type: str, inputs: list, attributes: dict | None = None, num_outputs: int = 1, **node):
    """Append one node to the translation being recorded (`onnxscript.evaluator.default()` while
    torch.onnx.export runs one); returns its outputs."""
    import onnx_ir as ir
    import onnxscript.evaluator

    recorder = onnxscript.evaluator.default()
    if not hasattr(recorder, "nodes"):
        raise OnnxExportError(f"{domain or 'ai.onnx'}::{op_type} must be translated inside torch.onnx.export(dynamo=True)")
    attrs = [value if isinstance(value, ir.Attr) else ir.convenience.convert_attribute(name, value)
             for name, value in (attributes or {}).items()]
    created = ir.Node(domain, op_type, inputs, attributes=attrs, num_outputs=num_outputs, **node)
    recorder.nodes.append(created)
    return created.outputs


def _emit(functions: dict, op_type: str, inputs: list, attributes: dict, build: Callable, overload: str = ""):
    """One ai.kvcompile node; its function goes to `functions`, added to the model after the
    export (see _export_program)."""
    key = (DOMAIN, op_type, overload)
    if key not in functions:
        functions[key] = build()
    return _record(DOMAIN, op_type, inputs, attributes, overload=overload, version=DOMAIN_VERSION)[0]


def _group_query_attention(q, past_k, past_v, new_k, new_v, scale: float):
    """`attention_with_cache` as onnxruntime's GroupQueryAttention: tokens in (B, S, H·D) layout,
    the cache in (B, Hkv, T, D); `seqlens_k` is each row's total length - 1 (no padding)."""
    import onnx_ir as ir

    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[3], new_k.shape[1]
    if not all(isinstance(size, int) for size in (num_heads, head_dim, num_kv_heads)):
        raise OnnxExportError(f"GroupQueryAttention needs static head counts and head_dim, got q {q.shape}, k {new_k.shape}")

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


def _bool_mask(mask):
    """The op's mask input: the program's boolean mask, or a broadcastable True when there is none.
    Additive float masks are not emitted by capture; refuse them rather than misread them."""
    import onnx_ir as ir

    if mask is None:
        return _record("", "Constant", [], {"value": ir.tensor(np.ones((1, 1, 1, 1), bool))})[0]
    if mask.dtype != ir.DataType.BOOL:
        raise OnnxExportError(f"attention masks of type {mask.dtype} are not supported by the ONNX export (boolean only)")
    return mask


# --------------------------------------------------------------------------------------------
# function bodies (standard ONNX ops), after kernels/ops.py


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


def _masked_softmax_attention(b: _Body, scores, q, v, mask):
    """softmax(scores + mask) @ v: scores (B, Hq, S, T) fp32 already scaled, v (B, Hkv, T, Dv).
    The causal part is data flow on the `is_causal` attribute (a function body cannot branch on
    an attribute): allowed = mask and (tril or not is_causal), SDPA's top-left convention."""
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


def _attention_function():
    b = _Body(["q", "k", "v", "mask"])
    q, k, v, mask = b.inputs
    scores = b.op("MatMul", _by_kv_head(b, q, v), _keys_transposed(b, k))
    out = _masked_softmax_attention(b, _scaled(b, scores, q), q, v, mask)
    return b.function("attention", out, attributes=("scale", "is_causal"))


def _pruned_function(count: int):
    """Scores per width group on the group's kept channels, stacked with one block of zeros and
    gathered into KV-head order, (B, Hkv, r, S, T): a KV head in no group reads the zeros
    (uniform attention), as in the reference. The gather index is built on the Hkv head ids alone,
    so no per-score index tensor is materialized."""
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
    out = _masked_softmax_attention(b, _scaled(b, scores, q), q, v, mask)
    return b.function("pruned_attention", out, attributes=("scale", "is_causal"), overload=f"groups{count}")


def _gather_function():
    b = _Body(["x", "heads", "channels"])
    x, heads, channels = b.inputs
    picked = b.op("Gather", x, heads, axis=1)  # (B, G, T, D)
    index = b.op("Expand", b.op("Unsqueeze", channels, b.ints(0, 2)),
                 b.op("Concat", b.shape(picked, 0, 3), b.shape(channels, 1, 2), axis=0))
    return b.function("gather_kv_channels", b.op("GatherElements", picked, index, axis=3))


def _merge_function():
    b = _Body(["x", "groups", "down"])
    x, groups, down = b.inputs
    grouped = b.op("Gather", x, b.op("Reshape", groups, b.ints(-1)), axis=1)  # (B, G*t, S, d)
    grouped = b.op("Reshape", grouped, b.op("Concat", b.shape(x, 0, 1), b.op("Shape", groups), b.shape(x, 2, 4), axis=0))
    per_token = b.op("Transpose", grouped, perm=[0, 1, 3, 2, 4])  # (B, G, S, t, d)
    flat = b.op("Reshape", per_token, b.op("Concat", b.shape(x, 0, 1), b.shape(groups, 0, 1), b.shape(x, 2, 3),
                                           b.ints(-1), axis=0))  # (B, G, S, t*d)
    return b.function("merge_heads", b.op("MatMul", flat, down))


def _project_function():
    b = _Body(["x", "heads", "weight"])
    x, heads, weight = b.inputs
    return b.function("project_heads", b.op("MatMul", b.op("Gather", x, heads, axis=1), weight))


_FLOAT, _BOOL = 1, 9  # onnx.TensorProto.FLOAT, BOOL


def _zero():
    import onnx_ir as ir

    return ir.tensor(np.zeros(1, np.float32))


def _one():
    import onnx_ir as ir

    return ir.tensor(np.ones(1, np.float32))


# --------------------------------------------------------------------------------------------
# running it


def generate(
    path: str | Path,
    input_ids,
    max_new_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    providers: Sequence[str] | None = None,
) -> torch.Tensor:
    """Greedy continuation with onnxruntime; returns prompt and new tokens, (B, S + new), like
    `TransformedModel.generate(..., do_sample=False)` (EOS from the manifest unless given; rows
    that emitted it keep emitting it until every row is done). Providers: CUDA when onnxruntime
    has it, else CPU."""
    prefill, decode, manifest = load_sessions(path, providers)
    tokens = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    eos = np.array(manifest["eos_token_id"] if eos_token_id is None else eos_token_ids(eos_token_id), dtype=np.int64)
    batch, length = tokens.shape
    outputs = _run(prefill, manifest["prefill"], tokens, _positions(batch, 0, length), {})
    done = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        next_token = outputs["logits"][:, -1].argmax(-1).astype(np.int64)
        if eos.size:
            next_token = np.where(done, eos[0], next_token)
            done |= np.isin(next_token, eos)
        tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
        if done.all() or step == max_new_tokens - 1:
            break
        past = {name.removeprefix("present_"): value for name, value in outputs.items() if name != "logits"}
        outputs = _run(decode, manifest["decode"], next_token[:, None], _positions(batch, length + step, 1), past)
    return torch.from_numpy(tokens)


def load_sessions(path: str | Path, providers: Sequence[str] | None = None):
    """(prefill session, decode session, manifest) of an exported folder."""
    import onnxruntime as ort

    folder = Path(path)
    manifest = json.loads((folder / MANIFEST).read_text())
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sessions = [ort.InferenceSession(str(folder / manifest[phase]["file"]), providers=list(providers))
                for phase in ("prefill", "decode")]
    return sessions[0], sessions[1], manifest


def run_program(session, names: dict, input_ids: np.ndarray, start: int, past: dict[str, np.ndarray]) -> dict:
    """One call of an exported program: the outputs by name (`logits`, `present_{entry}`)."""
    batch, seq = input_ids.shape
    return _run(session, names, input_ids, _positions(batch, start, seq), past)


def _run(session, names: dict, input_ids, position_ids, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feeds = {"input_ids": input_ids, "position_ids": position_ids}
    feeds.update({name: past[name.removeprefix("past_")] for name in names["inputs"][2:]})
    return dict(zip(names["outputs"], session.run(names["outputs"], feeds)))


def _positions(batch: int, start: int, length: int) -> np.ndarray:
    """position_ids as the runtime builds them: start..start+length-1 for every row."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (batch, length)).copy()
