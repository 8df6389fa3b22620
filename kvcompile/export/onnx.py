"""ONNX export of a transformed model: `export_onnx(model, plan, folder)` writes `prefill.onnx`,
`decode.onnx` and `manifest.json`, which `kvcompile.export.onnx_runtime.generate` decodes greedily
with stock onnxruntime, no kvcompile and no plugin. The ops' translations and function bodies are
in kvcompile/kernels/onnx_functions.py, with the ops.

Design, and why:

- **The programs are re-exported, not the model.** `compile_programs` makes, from the model's
  capture, two ATen FX programs with an explicit cache (`past_X` in, `present_X` out, see
  program.py). Re-exporting them with `torch.onnx.export(dynamo=True)` keeps that calling
  convention verbatim, so the ONNX loop is: feed every `present_X` back as `past_X`. Batch, sequence and past
  length stay dynamic (`dynamic_shapes`). The prefill reads no past, so its ONNX file takes only
  `input_ids` and `position_ids`: the empty pasts are made inside the graph.
- **Every `kvcompile::` op stays one node** of domain `ai.kvcompile` with a model-local FUNCTION
  (onnx_functions.py). The functions are added to the model only after `torch.onnx.export`
  returns, and its optimizer runs afterwards with `inline=False`: the exporter's opset conversion
  and optimizer inline every model-local function they see.
- **`gqa=True` hands attention to onnxruntime.** Where a plan leaves plain GQA attention, the
  FUSED_CACHE_UPDATE stage turns each site's cache concats and attention into one
  `kvcompile::attention_with_cache`, translated to `com.microsoft.GroupQueryAttention` (which
  appends to the cache itself); every other plan is refused for it, by field.
- **Windowed plans are refused.** Their runtime moves tokens from the full-channel window to the
  pruned middle between calls (`cache.flush_windows`), which an ONNX loop would have to replicate;
  until it does, exporting one would give a cache the loop cannot maintain. Any `kvcompile::` op
  without a translation is refused by name too: a silent fallback would be a wrong model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kvcompile.capture import capture
from kvcompile.kernels.onnx_functions import DOMAIN, DOMAIN_VERSION, SUPPORTED_OPS, add_functions, translation_table
from kvcompile.pipeline import FUSED_CACHE_UPDATE, compile_programs, run_stage
from kvcompile.plan import Plan
from kvcompile.program import TOKEN_INPUTS, Signature, call_program, clone_program, signature_of
from kvcompile.runtime import eos_token_ids, transform
from kvcompile.stores import write_json

from .onnx_runtime import DECODE, MANIFEST, MANIFEST_FORMAT, PREFILL

# Above this many bytes of parameters the weights go to external data files (protobuf caps at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1.5e9


class OnnxExportError(RuntimeError):
    """The transformed model cannot be exported to ONNX (names the plan field or the op)."""


def export_onnx(
    model: torch.nn.Module,
    plan: Plan,
    path: str | Path,
    *,
    program: torch.fx.GraphModule | None = None,
    external_data: bool | None = None,
    gqa: bool = False,
) -> Path:
    """Export `model` compiled for `plan` (`program`: its `kvcompile.capture`, to save tracing
    again) to the folder `path`: the prefill and decode programs in the explicit-cache convention.

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
    captured = program if program is not None else capture(model)
    tm = transform(model, plan, program=captured)  # checks model and plan; the empty cache, dtype, EOS ids
    compiled = compile_programs(captured, plan)  # the explicit-cache programs (the runtime's may write in place)
    programs = {"prefill": compiled.prefill, "decode": compiled.decode}
    if gqa:
        programs = {phase: run_stage(FUSED_CACHE_UPDATE, clone_program(gm), plan) for phase, gm in programs.items()}
    for phase, gm in programs.items():
        _check_ops(gm, phase)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_THRESHOLD

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # the manifest, written last, marks a finished export: an interrupted one over an older export
    # must not leave the old manifest describing the new files
    (folder / MANIFEST).unlink(missing_ok=True)
    prefill_module = _Prefill(programs["prefill"], tm.empty_cache)
    decode_sig = signature_of(programs["decode"])
    prefill_args, decode_args = _sample_calls(compiled.prefill, tm, decode_sig)
    prefill = export_program(prefill_module, prefill_module.signature, prefill_args, prefill_dynamic_shapes())
    decode = export_program(programs["decode"], decode_sig, decode_args, decode_dynamic_shapes(len(decode_sig.cache_inputs)))
    for exported, file in ((prefill, PREFILL), (decode, DECODE)):
        exported.save(folder / file, external_data=external_data)
        onnx.checker.check_model(str(folder / file), full_check=True)

    manifest = {
        "format": MANIFEST_FORMAT,
        "prefill": {"file": PREFILL, **dataclasses.asdict(prefill_module.signature)},
        "decode": {"file": DECODE, **dataclasses.asdict(decode_sig)},
        "cache_entries": decode_sig.cache_inputs,
        "shape": dataclasses.asdict(tm.shape),
        "plan_fingerprint": plan.fingerprint(),
        "dtype": str(tm.dtype).removeprefix("torch."),
        "eos_token_id": eos_token_ids(None, tm.generation_config),
        "domain": {"name": DOMAIN, "version": DOMAIN_VERSION},
        "attention": "com.microsoft.GroupQueryAttention" if gqa else f"{DOMAIN} functions",
        "opset": prefill.model.opset_imports[""],
        "external_data": external_data,
    }
    write_json(folder / MANIFEST, manifest)
    return folder


def export_program(module: torch.nn.Module, signature: Signature, args: tuple, dynamic_shapes):
    """torch.onnx.export(dynamo=True) of `module` called on `args`, inputs and outputs named by
    `signature`, with the kvcompile translations; the ai.kvcompile functions are added afterwards
    and the exporter's optimizer runs with inlining off, so the ai.kvcompile nodes survive.
    Returns the torch.onnx.ONNXProgram (`.save(path)`, `.model`)."""
    import onnxscript.optimizer

    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=list(signature.inputs),
            output_names=list(signature.outputs),
            custom_translation_table=translation_table(),
            optimize=False,
            verify=False,
            report=False,
            verbose=False,
        )
    add_functions(program.model)
    onnxscript.optimizer.optimize(program.model, inline=False)
    return program


def prefill_dynamic_shapes():
    """Dynamic batch and sequence of the prefill's token inputs."""
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    return ({0: batch, 1: seq}, {0: batch, 1: seq})


def decode_dynamic_shapes(num_cache_inputs: int):
    """Dynamic batch and sequence of a decode's token inputs, batch and past length of each of its
    `num_cache_inputs` cache inputs (B, H, T, D)."""
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, *({0: batch, 2: past} for _ in range(num_cache_inputs)))


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

    def __init__(self, program: torch.fx.GraphModule, empty_cache):
        super().__init__()
        self.program = program
        self.entries = signature_of(program).cache_inputs
        self.empty_cache = empty_cache  # TransformedModel.empty_cache, not a submodule: the parameters stay the program's
        self.signature = Signature(inputs=list(TOKEN_INPUTS), outputs=list(signature_of(program).outputs))
        self.eval()  # no dropout to speak of, but the exporter warns about training mode

    def forward(self, input_ids, position_ids):
        empty = self.empty_cache(input_ids.shape[0])
        return self.program(input_ids, position_ids, *(empty[entry] for entry in self.entries))


@torch.no_grad()
def _sample_calls(prefill: torch.fx.GraphModule, tm, decode_sig: Signature) -> tuple[tuple, tuple]:
    """Example arguments of the prefill (a prompt) and of the decode (new tokens, and the cache the
    prefill writes for the prompt, so the decode's example pasts have exactly the loop's shapes).
    Sizes distinct and > 1: export specializes sizes 0 and 1."""
    batch, seq, new = 2, 4, 3
    device = tm.device
    prefill_args = (torch.zeros(batch, seq, dtype=torch.long, device=device),
                    torch.arange(seq, device=device).expand(batch, -1))
    _, written = call_program(prefill, *prefill_args, tm.empty_cache(batch))
    decode_args = (
        torch.zeros(batch, new, dtype=torch.long, device=device),
        torch.arange(seq, seq + new, device=device).expand(batch, -1),
        *(written[entry] for entry in decode_sig.cache_inputs),
    )
    return prefill_args, decode_args
