"""ONNX export of a transformed model: `export_onnx(model, plan, folder)` writes `prefill.onnx`,
`decode.onnx`, their weights once in `weights.bin`, the plan and `manifest.json`, which
`kvcompile.export.onnx_runtime` decodes with stock onnxruntime, no plugin. The ops' translations
and function bodies are in kvcompile/kernels/onnx_functions.py, with the ops.

Design, and why:

- **The runtime's programs are exported.** The PyTorch runtime's prefill (prompt mask as an input:
  padded batches) and decode (the cache as buffers with capacity, written at each row's slots,
  attention up to each row's count; pipeline.IN_PLACE) are re-exported with
  `torch.onnx.export(dynamo=True)`. ONNX has no mutation, so the decode returns each buffer it
  writes (`present_X`, a ScatterElements of the new tokens into `past_X`,
  passes/cache_writes_as_outputs.py); the loop binds `present_X` to `past_X`'s memory, so the
  scatter writes in place and a step copies no byte of the cache.
- **The cache is the runtime's own.** The loop keeps a `CompressedKVCache` (cache.py) on the
  buffers onnxruntime reads and writes: the prompt is laid out, the per-row counts kept and the
  window tokens moved to the pruned middle by the same code as in PyTorch, from the plan saved in
  the folder. So windowed plans export, and the ONNX loop holds exactly the cache `transform` holds.
- **Every `kvcompile::` op stays one node** of domain `ai.kvcompile` with a model-local FUNCTION
  (onnx_functions.py). The functions are added to the model only after `torch.onnx.export`
  returns, and its optimizer runs afterwards with `inline=False`: the exporter's opset conversion
  and optimizer inline every model-local function they see. An op without a translation is
  refused by name: a silent fallback would be a wrong model.
- **Weights once.** Both programs share the model's parameters; their initializers go to one
  `weights.bin` that both files reference, each tensor stored once (by content).
- **Atomic.** Everything is written into a temporary sibling folder that then takes the folder's
  place, so an interrupted export leaves the old export whole (stores.directory_replaced_atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from kvcompile.cache import CompressedKVCache
from kvcompile.capture import CACHE_NAME, capture
from kvcompile.kernels.onnx_functions import DOMAIN, DOMAIN_VERSION, SUPPORTED_OPS, add_functions, translation_table
from kvcompile.layout import FULL, MIDDLE, RING, WINDOW, entry_layer, entry_region
from kvcompile.pipeline import CACHE_WRITES_AS_OUTPUTS, run_stage
from kvcompile.plan import ModelShape, Plan, decoder_config
from kvcompile.program import (
    CACHE_LENGTHS,
    CACHE_SLOTS,
    MIDDLE_LENGTHS,
    PREFILL_MASK,
    TOKEN_INPUTS,
    WINDOW_LENGTHS,
    WINDOW_SLOTS,
    Signature,
    clone_program,
    past,
    signature_of,
)
from kvcompile.runtime import eos_token_ids, prompt_positions_and_mask, transform
from kvcompile.stores import check_replaceable_directory, directory_replaced_atomically, write_json

from .onnx_runtime import DECODE, MANIFEST, MANIFEST_FORMAT, PLAN, PREFILL, WEIGHTS

# Initializers from this size on go to the shared weights file; smaller ones (shape constants) stay inline.
INLINE_LIMIT = 1024
# Offsets of the tensors in the weights file: page-aligned, so onnxruntime can map them.
WEIGHTS_ALIGNMENT = 4096


class OnnxExportError(RuntimeError):
    """The transformed model cannot be exported to ONNX (names the plan field or the op)."""


def export_onnx(model: torch.nn.Module, plan: Plan, path: str | Path, *,
                program: torch.fx.GraphModule | None = None) -> Path:
    """Export `model` compiled for `plan` (`program`: its `kvcompile.capture`, to save tracing
    again) to the folder `path`, replacing an earlier export there (a non-empty folder that holds
    no manifest is refused). Writes `prefill.onnx`, `decode.onnx`, `weights.bin` (the weights of
    both), `plan/` and `manifest.json` (files, input and output names in order, model shape,
    vocabulary size, plan fingerprint, dtype, EOS ids). Returns the folder."""
    import onnx

    folder = Path(path)
    check_replaceable_directory(folder, MANIFEST)  # before minutes of tracing, not after
    captured = program if program is not None else capture(model)
    tm = transform(model, plan, program=captured)  # checks model and plan; the runtime's programs and cache
    decode_program = run_stage(CACHE_WRITES_AS_OUTPUTS, clone_program(tm.decode_program), plan)
    for phase, gm in (("prefill", tm.prefill_program), ("decode", decode_program)):
        _check_ops(gm, phase)
    prefill_module = _Prefill(tm.prefill_program, tm.empty_cache)
    decode_sig = signature_of(decode_program)
    prefill_args = _sample_prompt(tm.device)
    decode_args = decode_sample_args(getattr(tm(prefill_args[0]), CACHE_NAME), decode_sig)
    programs = {
        PREFILL: export_program(prefill_module, prefill_module.signature, prefill_args, prefill_dynamic_shapes()),
        DECODE: export_program(decode_program, decode_sig, decode_args, decode_dynamic_shapes(decode_sig, plan, tm.shape)),
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "prefill": {"file": PREFILL, **dataclasses.asdict(prefill_module.signature)},
        "decode": {"file": DECODE, **dataclasses.asdict(decode_sig)},
        "weights": {"file": WEIGHTS},
        "plan": {"file": PLAN, "fingerprint": plan.fingerprint()},
        "shape": dataclasses.asdict(tm.shape),
        "vocab_size": decoder_config(model.config).vocab_size,
        "dtype": str(tm.dtype).removeprefix("torch."),
        "eos_token_id": eos_token_ids(None, tm.generation_config),
        "domain": {"name": DOMAIN, "version": DOMAIN_VERSION},
        "opset": programs[PREFILL].model.opset_imports[""],
        "cache": "decode writes each present_X into past_X: bind both to one buffer (see onnx_runtime.py)",
    }
    with directory_replaced_atomically(folder, MANIFEST) as staging:
        store_with_shared_weights({file: exported.model for file, exported in programs.items()}, staging)
        for file in programs:
            onnx.checker.check_model(str(staging / file), full_check=True)
        plan.save(staging / PLAN)
        write_json(staging / MANIFEST, manifest)
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


def store_with_shared_weights(models: dict[str, object], folder: Path) -> None:
    """Save each `onnx_ir.Model` as `folder/{file}`, every initializer of INLINE_LIMIT bytes or more
    moved to `folder/weights.bin`, stored once however many models (or names) hold the same tensor."""
    import onnx_ir as ir

    stored: dict[tuple, tuple[int, int]] = {}  # (dtype, shape, sha256) -> (offset, length)
    with open(folder / WEIGHTS, "wb") as weights:
        for model in models.values():
            for value in model.graph.initializers.values():
                tensor = value.const_value
                data = tensor.tobytes()
                if len(data) < INLINE_LIMIT:
                    continue
                key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(data).hexdigest())
                if key not in stored:
                    offset = -weights.tell() % WEIGHTS_ALIGNMENT + weights.tell()
                    weights.seek(offset)
                    weights.write(data)
                    stored[key] = (offset, len(data))
                offset, length = stored[key]
                value.const_value = ir.ExternalTensor(WEIGHTS, offset, length, tensor.dtype, shape=tensor.shape,
                                                      name=value.name, base_dir=folder)
    for file, model in models.items():
        ir.save(model, folder / file)


def prefill_dynamic_shapes():
    """Dynamic batch and sequence of the prefill's inputs: tokens, positions, prompt mask (B, 1, S, S)."""
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 2: seq, 3: seq})


def decode_dynamic_shapes(signature: Signature, plan: Plan, shape: ModelShape) -> tuple:
    """Dynamic sizes of each decode input, in order: batch and new tokens of the tokens and slots,
    batch of the lengths, batch and capacity of each cache buffer (one capacity per region and ring
    size: the cache grows each on its own)."""
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    capacity = {key: Dim(f"{key}_capacity") for key in {_capacity_key(plan, shape, e) for e in signature.cache_inputs}}
    per_index = {CACHE_SLOTS: {0: batch, 1: seq}, WINDOW_SLOTS: {0: batch, 1: seq}, CACHE_LENGTHS: {0: batch},
                 WINDOW_LENGTHS: {0: batch}, MIDDLE_LENGTHS: {0: batch}}
    shapes = [{0: batch, 1: seq}, {0: batch, 1: seq}]
    shapes += [{0: batch, 2: capacity[_capacity_key(plan, shape, entry)]} for entry in signature.cache_inputs]
    shapes += [per_index[name] for name in signature.index_inputs]
    return tuple(shapes)


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
    """The prefill program with its empty pasts made inside, so the ONNX prefill takes only the
    prompt: tokens, positions and the prompt mask."""

    def __init__(self, program: torch.fx.GraphModule, empty_cache):
        super().__init__()
        self.program = program
        self.empty_cache = empty_cache  # TransformedModel.empty_cache, not a submodule: the parameters stay the program's
        self.signature = Signature(inputs=[*TOKEN_INPUTS, PREFILL_MASK], outputs=list(signature_of(program).outputs))
        self.eval()  # no dropout to speak of, but the exporter warns about training mode

    def forward(self, input_ids, position_ids, prefill_mask):
        values = {"input_ids": input_ids, "position_ids": position_ids, PREFILL_MASK: prefill_mask}
        values.update({past(entry): tensor for entry, tensor in self.empty_cache(input_ids.shape[0]).items()})
        return self.program(*(values[name] for name in signature_of(self.program).inputs))


def _sample_prompt(device) -> tuple:
    """Example arguments of the prefill: a prompt of 2 rows of 4 tokens, none padding."""
    batch, seq = 2, 4
    positions, mask = prompt_positions_and_mask(torch.ones(batch, seq, dtype=torch.bool, device=device))
    return torch.zeros(batch, seq, dtype=torch.long, device=device), positions, mask


def decode_sample_args(cache: CompressedKVCache, signature: Signature, new: int = 3) -> tuple:
    """Example arguments of a decode of `new` tokens continuing `cache`, in `signature`'s order:
    its index inputs, and buffers shaped like its own but with a distinct capacity per region and
    ring size (`_capacity_key`), so that export keeps those capacities apart. Sizes > 1: export
    specializes sizes 0 and 1."""
    device = cache.lengths.device
    indices = cache.prepare_call(new)
    window = cache.window_capacity(new)
    capacity = {WINDOW: window, FULL: window + 11, MIDDLE: window + 23}
    for entry in cache.buffers:
        key = _capacity_key(cache.plan, cache.shape, entry)
        if key not in capacity:  # a ring: the slots a call of `new` needs, a size no other capacity has
            size = cache.ring_capacity(entry_layer(entry), new)
            while size in capacity.values():
                size += 1
            capacity[key] = size
    values = {
        "input_ids": torch.zeros(cache.batch_size, new, dtype=torch.long, device=device),
        "position_ids": cache.lengths[:, None] + torch.arange(new, device=device),
        **indices,
    }
    for entry, buffer in cache.buffers.items():
        size = capacity[_capacity_key(cache.plan, cache.shape, entry)]
        values[past(entry)] = buffer.new_zeros(buffer.shape[0], buffer.shape[1], size, buffer.shape[3])
    return tuple(values[name] for name in signature.inputs)


def _capacity_key(plan: Plan, shape: ModelShape, entry: str) -> str:
    """Which dynamic capacity an entry's buffer has: its region's, or for a sliding layer's ring
    that of the rings of its window size (the cache grows each of these on its own)."""
    region = entry_region(plan, shape, entry)
    return f"{RING}{shape.window(entry_layer(entry))}" if region == RING else region
