"""onnxruntime decode latency: the dense model's export vs compressed exports, in one run.

Each variant is an explicit-cache decode program (pipeline.compile_programs, one capture for all)
exported by `kvcompile.export.onnx.export_program` (the dense one is the canonical program of an
empty plan: the same calling convention and attention function, every channel), run in a CPU
session on a cache of `context` random tokens, encoded by the plan's cache encoder. A step is one
new token per sequence; the past is fed unchanged every repetition, so every timed step reads a
cache of exactly `context` tokens. Reported: median milliseconds per step and dense / variant.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvcompile.capture import capture
from kvcompile.export.onnx import decode_dynamic_shapes, export_program
from kvcompile.layout import key_entry, value_entry
from kvcompile.pipeline import canonical_program, compile_programs
from kvcompile.plan import ModelShape, Plan
from kvcompile.program import TOKEN_INPUTS, past, signature_of

from .throughput import random_dense_cache

DENSE = "dense"


def _dense_decode(captured):
    program = canonical_program(captured, Plan.from_k_channels({}))
    return program, lambda keys, values: {
        **{key_entry(layer): k for layer, k in enumerate(keys)},
        **{value_entry(layer): v for layer, v in enumerate(values)},
    }


def _compressed_decode(captured, plan: Plan):
    programs = compile_programs(captured, plan)
    encoder = programs.cache_encoder
    if encoder is None:
        raise ValueError("plans that merge KV heads have no cache encoder: their cache is not a function of dense K/V")
    entries = signature_of(encoder).cache_outputs
    return programs.decode, lambda keys, values: dict(zip(entries, encoder(*keys, *values)))


def _export_decode(program, pasts: dict[str, torch.Tensor], path: Path) -> Path:
    """`program` (explicit-cache decode) as ONNX, traced on a 3-token call over `pasts`."""
    sig = signature_of(program)
    batch, past_length = next(iter(pasts.values())).shape[0], next(iter(pasts.values())).shape[2]
    ids = torch.zeros(batch, 3, dtype=torch.long)
    positions = torch.arange(past_length, past_length + 3).expand(batch, -1)
    args = (ids, positions, *(pasts[entry] for entry in sig.cache_inputs))
    export_program(program, sig, args, decode_dynamic_shapes(len(sig.cache_inputs))).save(path)
    return path


def _step_ms(session, names, feeds: dict[str, np.ndarray], reps: int) -> float:
    session.run(names, feeds)  # first run allocates and plans
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(names, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def run(model, plans: dict[str, Plan], contexts=(2048, 8192), *, batch: int = 1, reps: int = 10,
        threads: int | None = None) -> dict:  # fmt: skip
    """Median ms per decode step of the dense export and of each plan's, at each context length."""
    import onnxruntime as ort

    if DENSE in plans:
        raise ValueError(f"{DENSE!r} names the dense baseline; give the plans other names")
    shape = ModelShape.from_config(model.config)
    for name, plan in plans.items():
        plan.validate(shape)
        if plan.windowed:
            raise ValueError(f"plan {name!r} keeps windows, which the explicit-cache decode does not maintain; "
                             "use plan.with_windows(0, 0)")
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()  # .float()/.cpu() would convert the user's model in place
    captured = capture(model)
    variants = {DENSE: _dense_decode(captured), **{name: _compressed_decode(captured, plan) for name, plan in plans.items()}}
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    ms = {name: {} for name in variants}
    with tempfile.TemporaryDirectory() as folder:
        example = random_dense_cache(shape, 2, 4, torch.float32, torch.device("cpu"))
        sessions = {}
        for name, (program, encode) in variants.items():
            path = _export_decode(program, encode([k for k, _ in example], [v for _, v in example]),
                                  Path(folder) / f"{name}.onnx")
            sessions[name] = (ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                              signature_of(program))
        for context in contexts:
            layers = random_dense_cache(shape, batch, context, torch.float32, torch.device("cpu"))
            keys, values = [k for k, _ in layers], [v for _, v in layers]
            for name, (session, sig) in sessions.items():
                pasts = variants[name][1](keys, values)
                tokens = (np.full((batch, 1), 3, dtype=np.int64), np.full((batch, 1), context, dtype=np.int64))
                feeds = dict(zip(TOKEN_INPUTS, tokens))
                feeds.update({past(entry): pasts[entry].numpy() for entry in sig.cache_inputs})
                ms[name][context] = round(_step_ms(session, list(sig.outputs), feeds, reps), 3)
    return {
        "onnxruntime": ort.__version__,
        "provider": "CPUExecutionProvider",
        "threads": threads or "default",
        "model": type(model).__name__,
        "batch": batch,
        "ms_per_step": ms,
        "dense_over_variant": {name: {c: round(ms[DENSE][c] / ms[name][c], 3) for c in contexts} for name in ms},
    }


def format_table(report: dict) -> str:
    contexts = list(report["ms_per_step"][DENSE])
    lines = [f"onnxruntime {report['onnxruntime']} CPU decode step, {report['model']}, batch {report['batch']}: "
             "median ms (dense / variant)",
             f"{'export':>14}" + "".join(f"  {f'context {c}':>22}" for c in contexts)]
    for name, row in report["ms_per_step"].items():
        ratios = report["dense_over_variant"][name]
        lines.append(f"{name:>14}" + "".join(f"  {row[c]:>12.2f} ({ratios[c]:.2f}x)" for c in contexts))
    return "\n".join(lines)
