"""onnxruntime decode latency: the dense model's export vs compressed exports, in one run.

Each variant is the decode program `export_onnx` writes (pipeline.IN_PLACE's decode, its cache
writes returned and bound to the inputs' memory); the dense one is an empty plan's (every channel,
the same attention function, the same in-place cache). Each runs in a CPU session on the
`CompressedKVCache` the runtime would hold after a prompt of `context` random tokens (the plan's
cache encoder, then `write_prompt`: windows split, middle filled), allocated for `context + 1`
tokens. A timed step is an `onnx_runtime.DecodeCall` as `generate` makes it (inputs bound, one new
token per row written in place into the buffers bound at the first step), repeated on the same slot, so every step reads a cache
of exactly `context + 1` tokens; the window moves `generate` does every `plan.buffer` steps are
not timed. Reported per variant and context: median ms per step with min-max, dense / variant,
and the byte-ideal ratio: at batch 1 a step reads every weight and every cached byte once, so no
export can beat (weights + dense cache) / (weights + its cache) bytes.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvcompile.cache import CompressedKVCache
from kvcompile.capture import capture
from kvcompile.export.onnx import decode_dynamic_shapes, decode_sample_args, export_program
from kvcompile.export.onnx_runtime import DecodeCall
from kvcompile.pipeline import CACHE_WRITES_AS_OUTPUTS, IN_PLACE, compile_programs, run_stage
from kvcompile.plan import ModelShape, Plan
from kvcompile.program import signature_of

from .throughput import random_dense_cache

DENSE = "dense"


class _Variant:
    """One plan's in-place decode exported to ONNX, and the cache its runtime keeps for a prompt."""

    def __init__(self, captured, plan: Plan, shape: ModelShape, folder: Path, options):
        import onnxruntime as ort

        programs = compile_programs(captured, plan, IN_PLACE)
        if programs.cache_encoder is None:
            raise ValueError("plans that merge KV heads have no cache encoder: their cache is not a function of dense K/V")
        self.plan, self.shape, self.encoder = plan, shape, programs.cache_encoder
        self.decode = run_stage(CACHE_WRITES_AS_OUTPUTS, programs.decode, plan)
        self.signature = signature_of(self.decode)
        example = self.cache(random_dense_cache(shape, 2, 4, torch.float32, torch.device("cpu")), capacity=None)
        path = folder / f"decode-{plan.fingerprint()}.onnx"
        args = decode_sample_args(example, self.signature)
        export_program(self.decode, self.signature, args, decode_dynamic_shapes(self.signature, plan, shape)).save(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.call = DecodeCall(self.session, self.signature)

    @torch.no_grad()
    def cache(self, layers, capacity: int | None) -> CompressedKVCache:
        keys, values = [k for k, _ in layers], [v for _, v in layers]
        entries = dict(zip(signature_of(self.encoder).cache_outputs, self.encoder(*keys, *values)))
        cache = CompressedKVCache(self.plan, self.shape)
        cache.write_prompt(entries, None, capacity)
        return cache

    def step_ms(self, cache: CompressedKVCache, reps: int) -> list[float]:
        """Milliseconds of `reps` steps of one token per row, after one untimed (warm-up) step."""
        indices = cache.prepare_call(1)
        batch = cache.batch_size
        values = {"input_ids": torch.full((batch, 1), 3), "position_ids": cache.lengths[:, None], **indices}
        self.call(values, cache.buffers)  # the first run binds the buffers, allocates and plans
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            self.call(values, cache.buffers)
            times.append((time.perf_counter() - start) * 1e3)
        return times


@torch.no_grad()
def run(model, plans: dict[str, Plan], contexts=(2048, 8192), *, batch: int = 1, reps: int = 20,
        threads: int | None = None) -> dict:  # fmt: skip
    """Per-step milliseconds of the dense export and of each plan's at each context length."""
    import onnxruntime as ort

    if DENSE in plans:
        raise ValueError(f"{DENSE!r} names the dense baseline; give the plans other names")
    shape = ModelShape.from_config(model.config)
    for plan in plans.values():
        plan.validate(shape)
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()  # .float()/.cpu() would convert the user's model in place
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied embedding once
    captured = capture(model)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    ms, cache_bytes = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        variants = {name: _Variant(captured, plan, shape, Path(folder), options)
                    for name, plan in {DENSE: Plan.from_k_channels({}), **plans}.items()}
        for context in contexts:
            layers = random_dense_cache(shape, batch, context, torch.float32, torch.device("cpu"))
            for name, variant in variants.items():
                cache = variant.cache(layers, capacity=context + 1)
                times = variant.step_ms(cache, reps)
                ms.setdefault(name, {})[context] = {"median": round(statistics.median(times), 3),
                                                    "min": round(min(times), 3), "max": round(max(times), 3)}
                cache_bytes.setdefault(name, {})[context] = cache.nbytes
                del cache
    median = {name: {c: row[c]["median"] for c in contexts} for name, row in ms.items()}
    ideal = {name: {c: round((weight_bytes + cache_bytes[DENSE][c]) / (weight_bytes + cache_bytes[name][c]), 3)
                    for c in contexts} for name in ms}
    speedup = {name: {c: round(median[DENSE][c] / median[name][c], 3) for c in contexts} for name in ms}
    return {
        "onnxruntime": ort.__version__,
        "provider": "CPUExecutionProvider",
        "threads": threads or "default",
        "model": type(model).__name__,
        "batch": batch,
        "reps": reps,
        "weight_bytes": weight_bytes,
        "cache_bytes": cache_bytes,
        "ms_per_step": ms,
        "dense_over_variant": speedup,
        "byte_ideal": ideal,
        "of_ideal": {name: {c: round(speedup[name][c] / ideal[name][c], 3) for c in contexts} for name in ms},
    }


def format_table(report: dict) -> str:
    contexts = list(report["ms_per_step"][DENSE])
    lines = [f"onnxruntime {report['onnxruntime']} CPU decode step, {report['model']}, batch {report['batch']}, "
             f"{report['reps']} steps: median ms [min-max] (dense / variant; byte-ideal)",
             f"{'export':>16}" + "".join(f"  {f'context {c}':>36}" for c in contexts)]
    for name, row in report["ms_per_step"].items():
        cells = []
        for c in contexts:
            t = row[c]
            cells.append(f"{t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}] "
                         f"({report['dense_over_variant'][name][c]:.2f}x; {report['byte_ideal'][name][c]:.2f}x)")
        lines.append(f"{name:>16}" + "".join(f"  {cell:>36}" for cell in cells))
    return "\n".join(lines)
