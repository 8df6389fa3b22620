"""End-to-end decode throughput: tokens/s of a whole model decoding on a long cache.

Three ways to run one model under one plan, timed in the same process on caches of the same length:

- ``dense``: the transformers model as it is, eager, with its DynamicCache;
- ``transformed``: `kvcompile.transform(model, plan)` on the compressed cache (its decode attention
  runs the Triton kernels on CUDA);
- ``compiled``: `torch.compile(model, backend="kvcompile", options={"plan": plan})` with the model's
  DynamicCache (the backend takes no windows, so it gets the plan's channels without them).

The caches are filled with random keys and values instead of a prefill: decode speed depends on the
cache's length and layout, not its contents, and a 32K-token prefill's logits alone would not fit
in memory for a 128K-vocabulary model. Each method decodes `warmup` steps (compiling, for
`compiled`), then `repeats` blocks of `steps` timed steps, greedy on its own logits, all in one
process; a method's rate is the median block's, reported with the slowest and fastest block.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvcompile.capture import dynamic_cache_holding
from kvcompile.plan import ModelShape, Plan
from kvcompile.runtime import transform

from .bench import LEANK_COUNTS

METHODS = ("dense", "transformed", "compiled")


def llama_8b_shaped(vocab_size: int = 128256, num_layers: int = 32):
    """A random-weight Llama with Llama-3.1-8B's shapes (bf16, on the current CUDA device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device("cuda"):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def leank_mask_plan(shape: ModelShape, sink: int = 128, recent: int = 1024, seed: int = 0) -> Plan:
    """The published Llama-3.1-8B LeanK mask's kept counts, on random channel sets, with windows."""
    counts = json.loads(Path(LEANK_COUNTS).read_text())["kept_channels_per_layer_per_kv_head"]
    generator = torch.Generator().manual_seed(seed)
    channels = {
        layer: [sorted(torch.randperm(shape.head_dim, generator=generator)[:count].tolist()) for count in heads]
        for layer, heads in enumerate(counts[: shape.num_layers])
    }
    return Plan.from_k_channels(channels, model=shape, meta={"method": "leank-counts-random-channels"},
                                sink=sink, recent=recent)


def random_dense_cache(shape: ModelShape, batch: int, context: int, dtype, device, seed: int = 0):
    """Per layer (keys, values), each (B, Hkv, T, D), standard normal."""
    generator = torch.Generator(device=device).manual_seed(seed)
    size = (batch, shape.num_kv_heads, context, shape.head_dim)
    return [
        (torch.randn(size, generator=generator, dtype=dtype, device=device),
         torch.randn(size, generator=generator, dtype=dtype, device=device))
        for _ in range(shape.num_layers)
    ]  # fmt: skip


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _decode_rates(model, cache, batch: int, vocab_size: int, device, warmup: int, steps: int,
                  repeats: int) -> list[float]:  # fmt: skip
    """Tokens/s (greedy steps per second times the batch) of each of `repeats` blocks of `steps`
    decode steps of `model` from `cache`, after `warmup` steps."""
    token = torch.randint(3, vocab_size, (batch, 1), device=device, generator=torch.Generator(device=device).manual_seed(1))

    def decode(count: int) -> None:
        nonlocal cache, token
        for _ in range(count):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    decode(warmup)
    rates = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        decode(steps)
        _synchronize(device)
        rates.append(batch * steps / (time.perf_counter() - start))
    return rates


def run(model, plan: Plan, batch: int, context: int, *, steps: int = 20, warmup: int = 4, repeats: int = 3,
        methods=METHODS) -> dict:  # fmt: skip
    """Decode tokens/s of `model` under `plan` (see the module docstring) for each of `methods`."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    shape = ModelShape.from_config(model.config)
    plan.validate(shape)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    rates, ranges, failures = {}, {}, {}
    for method in methods:
        print(f"throughput: {method} ...", file=sys.stderr, flush=True)
        try:
            blocks = _method_rates(method, model, plan, shape, batch, context, dtype, device, warmup, steps, repeats)
            rates[method] = round(statistics.median(blocks), 1)
            ranges[method] = [round(min(blocks), 1), round(max(blocks), 1)]
        except torch.OutOfMemoryError as err:  # e.g. a compiled graph holds the old and new cache at once
            failures[method] = f"out of memory: {str(err).splitlines()[0]}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__},
        "model": type(model).__name__,
        "shape": {**vars(shape)},
        "plan": {"method": plan.meta.get("method", "?"), "sink": plan.sink, "recent": plan.recent},
        "dtype": str(dtype),
        "batch": batch,
        "context": context,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "tokens_per_s": rates,
        "tokens_per_s_min_max": ranges,
        "speedup_vs_dense": {m: round(rates[m] / rates["dense"], 3) for m in rates} if "dense" in rates else {},
        "failed": failures,
    }


def _method_rates(method, model, plan, shape, batch, context, dtype, device, warmup, steps, repeats) -> list[float]:
    layers = random_dense_cache(shape, batch, context, dtype, device)
    if method == "transformed":
        runner = transform(model, plan)
        cache = runner.encode_dense_cache([k for k, _ in layers], [v for _, v in layers],
                                          max_cache_len=context + warmup + steps * repeats)
    else:
        runner = model
        if method == "compiled":
            torch._dynamo.reset()
            runner = torch.compile(model, backend="kvcompile", options={"plan": replace(plan, sink=0, recent=0)})
        cache = dynamic_cache_holding([k for k, _ in layers], [v for _, v in layers])
    del layers
    return _decode_rates(runner, cache, batch, model.config.vocab_size, device, warmup, steps, repeats)


def format_row(report: dict) -> str:
    rates, ranges = report["tokens_per_s"], report["tokens_per_s_min_max"]
    cells = "  ".join(f"{m} {rates[m]:.1f} [{ranges[m][0]:.1f}-{ranges[m][1]:.1f}]" +
                      (f" ({report['speedup_vs_dense'][m]:.2f}x)" if m != "dense" and report["speedup_vs_dense"] else "")
                      for m in rates)
    cells += "".join(f"  {m} failed ({why})" for m, why in report["failed"].items())
    return (f"{report['model']} {report['shape']['num_layers']}L, {report['dtype']}, batch {report['batch']} x "
            f"context {report['context']}, {report['device']}: tokens/s, median [min-max] of {report['repeats']} x "
        f"{report['steps']} steps {cells}")
