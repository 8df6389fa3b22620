"""onnxruntime decode latency: the dense model's export vs compressed exports, in one run.

Each variant is the decode program `export_onnx` writes (pipeline.IN_PLACE's decode, its cache
writes returned and bound to the inputs' memory); the dense one is an empty plan's (every channel,
the same attention function, the same in-place cache). Each runs in a CPU session on the
`CompressedKVCache` the runtime would hold after a prompt of `context` random tokens (the plan's
cache encoder, then `write_prompt`: windows split, middle filled), allocated for `context + 1`
tokens. A timed step is an `onnx_runtime.DecodeCall` as `generate` makes it (inputs bound, one new
token per row written in place into the buffers bound at the first step), repeated on the same
slot, so every step reads a cache of exactly `context + 1` tokens; the window moves `generate`
does every `plan.buffer` steps are not timed. The variants' steps alternate (one step of each, then
again), so a machine whose load changes during the run weighs on every variant alike; the load
average before and after is reported, and beside each step's wall time the CPU time the process
spent in it (on a machine that other work keeps busy, the wall time also counts the time the step
waited for a core). Reported per variant and context: median ms per step with min-max, dense /
variant (of wall and of CPU time), and the byte-ideal ratio: at batch 1 a step reads every weight
and every cached byte once, so no export can beat (weights + dense cache) / (weights + its cache)
bytes.

Sessions run `threads` intra-op threads, one unless told (the CLI's `--threads`): a batch-1 step
is a chain of small products, and where the machine runs other work too, a product split over two
threads waits for whichever is not running (the README's ONNX section has both measured).
"""

from __future__ import annotations

import copy
import os
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

    def steps(self, cache: CompressedKVCache):
        """A function timing one step of one token per row on `cache`: (wall, process CPU)
        milliseconds. One untimed step first: the first run binds the buffers, allocates and plans."""
        indices = cache.prepare_call(1)
        batch = cache.batch_size
        values = {"input_ids": torch.full((batch, 1), 3), "position_ids": cache.lengths[:, None], **indices}
        self.call(values, cache.buffers)

        def step_ms() -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            self.call(values, cache.buffers)
            return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3

        return step_ms


@torch.no_grad()
def run(model, plans: dict[str, Plan], contexts=(2048, 8192), *, batch: int = 1, reps: int = 20,
        threads: int = 1) -> dict:  # fmt: skip
    """Per-step milliseconds of the dense export and of each plan's at each context length, in
    sessions of `threads` intra-op threads."""
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
    options.intra_op_num_threads = threads
    ms, cpu_ms, cache_bytes = {}, {}, {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        variants = {name: _Variant(captured, plan, shape, Path(folder), options)
                    for name, plan in {DENSE: Plan.from_k_channels({}), **plans}.items()}
        for context in contexts:
            layers = random_dense_cache(shape, batch, context, torch.float32, torch.device("cpu"))
            caches = {name: variant.cache(layers, capacity=context + 1) for name, variant in variants.items()}
            steps = {name: variants[name].steps(cache) for name, cache in caches.items()}
            times = {name: [] for name in variants}
            for _ in range(reps):
                for name, step_ms in steps.items():
                    times[name].append(step_ms())
            for name, cache in caches.items():
                wall, cpu = zip(*times[name])
                ms.setdefault(name, {})[context] = {"median": round(statistics.median(wall), 3),
                                                    "min": round(min(wall), 3), "max": round(max(wall), 3)}
                cpu_ms.setdefault(name, {})[context] = round(statistics.median(cpu), 3)
                cache_bytes.setdefault(name, {})[context] = cache.nbytes
            del caches, steps
    median = {name: {c: row[c]["median"] for c in contexts} for name, row in ms.items()}
    ideal = {name: {c: round((weight_bytes + cache_bytes[DENSE][c]) / (weight_bytes + cache_bytes[name][c]), 3)
                    for c in contexts} for name in ms}
    speedup = {name: {c: round(median[DENSE][c] / median[name][c], 3) for c in contexts} for name in ms}
    cpu_speedup = {name: {c: round(cpu_ms[DENSE][c] / cpu_ms[name][c], 3) for c in contexts} for name in ms}
    return {
        "onnxruntime": ort.__version__,
        "provider": "CPUExecutionProvider",
        "threads": threads,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "model": type(model).__name__,
        "batch": batch,
        "reps": reps,
        "weight_bytes": weight_bytes,
        "cache_bytes": cache_bytes,
        "ms_per_step": ms,
        "cpu_ms_per_step": cpu_ms,
        "dense_over_variant": speedup,
        "dense_over_variant_cpu": cpu_speedup,
        "byte_ideal": ideal,
        "of_ideal": {name: {c: round(speedup[name][c] / ideal[name][c], 3) for c in contexts} for name in ms},
        "of_ideal_cpu": {name: {c: round(cpu_speedup[name][c] / ideal[name][c], 3) for c in contexts} for name in ms},
    }


def format_table(report: dict) -> str:
    contexts = list(report["ms_per_step"][DENSE])
    lines = [f"onnxruntime {report['onnxruntime']} CPU decode step, {report['model']}, batch {report['batch']}, "
             f"{report['threads']} intra-op thread(s), {report['reps']} steps: median wall ms [min-max] (dense / "
             f"variant), median CPU ms (dense / variant); byte-ideal dense / variant",
             f"{'export':>16}" + "".join(f"  {f'context {c}':>50}" for c in contexts)]
    for name, row in report["ms_per_step"].items():
        cells = []
        for c in contexts:
            t = row[c]
            cells.append(f"{t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}] ({report['dense_over_variant'][name][c]:.2f}x)"
                         f", {report['cpu_ms_per_step'][name][c]:.2f} ({report['dense_over_variant_cpu'][name][c]:.2f}x)"
                         f"; {report['byte_ideal'][name][c]:.2f}x")
        lines.append(f"{name:>16}" + "".join(f"  {cell:>50}" for cell in cells))
    load = report["load_average"]
    lines.append(f"load average (1, 5, 15 min): {load['before']} before, {load['after']} after")
    return "\n".join(lines)
