"""End-to-end decode throughput: tokens/s of a whole model decoding on a long cache.

Ways to run one model, timed in the same process on caches of the same length:

- ``dense``: the transformers model as it is, eager, with its DynamicCache;
- ``static-compiled``: transformers' StaticCache and `torch.compile(mode="reduce-overhead")`, the
  fastest stock path (CUDA graphs of the compiled step);
- ``dense-twin``: `kvcompile.transform` under a plan that keeps every channel and no windows: the
  same programs, kernels and CUDA graphs as ``transformed`` over the full cache, the fair stand-in
  for a serving engine's dense decode;
- ``transformed``: `kvcompile.transform(model, plan)` on the compressed cache;
- ``compiled``: `torch.compile(model, backend="kvcompile", mode="reduce-overhead")` on the plan's
  compressed cache, `kvcompile.cache_for(model, plan)`: transformers' own forward, its attention
  lowered by the backend, replayed from inductor's CUDA graph trees;
- ``compiled-own-graphs``: the same with the backend's option cuda_graphs="kvcompile": the decode
  step replayed from CUDA graphs kvcompile captures (graphs.ReplayedCalls).

The caches are filled with random keys and values instead of a prefill: decode speed depends on the
cache's length and layout, not its contents, and a 32K-token prefill's logits alone would not fit
in memory for a 128K-vocabulary model. Each method decodes `warmup` steps (compiling, capturing),
then more blocks of `steps` steps until two blocks in a row agree within 5% (at most
`STABILIZING_BLOCKS`), then `repeats` blocks of `steps` timed steps, greedy on its own logits, all
in one process; a method's rate is the median block's, reported with the slowest and fastest
block. Each row also says the bytes one step reads (the weights and the cache it attends over) and
the rate it reads them at; `byte_ideal_speedup` is the dense step's bytes over the plan's.
"""

from __future__ import annotations

import gc
import inspect
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from kvcompile.cache import CompressedKVCache
from kvcompile.capture import CACHE_NAME, capture, dynamic_cache_holding
from kvcompile.layout import MIDDLE, entry_region, layer_entries
from kvcompile.plan import ModelShape, Plan
from kvcompile.runtime import transform
from kvcompile.static_cache import cache_for

from .bench import LEANK_COUNTS

METHODS = ("dense", "static-compiled", "dense-twin", "transformed", "compiled", "compiled-own-graphs")
STABILIZING_BLOCKS = 5
STABLE = 0.05  # two warm blocks this close in time: the method is warm


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


def random_compressed_cache(plan: Plan, shape: ModelShape, batch: int, context: int, capacity: int, dtype, device,
                            seed: int = 0) -> CompressedKVCache:
    """The runtime's cache under `plan` holding `context` standard-normal tokens per row, written as a
    prefill writes its outputs (`CompressedKVCache.write_prompt`): the layout of any plan, merged heads
    and healed projections included, whose caches are no function of a dense cache."""
    generator = torch.Generator(device=device).manual_seed(seed)
    present = {
        name: torch.randn(batch, heads, context, width, generator=generator, dtype=dtype, device=device)
        for layer in range(shape.num_layers)
        for name, (heads, width) in layer_entries(plan, layer, shape).items()
        if entry_region(plan, shape, name) != MIDDLE  # a windowed layer's middle: cut from its window's tokens
    }
    cache = CompressedKVCache(plan, shape)
    cache.write_prompt(present, None, capacity)
    return cache


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_steps(model, cache, batch: int, vocab_size: int, device) -> Callable[[int], None]:
    """decode(count): `count` greedy decode steps of `model` from `cache`, each on the token the one
    before chose (the first on a random one)."""
    token = torch.randint(3, vocab_size, (batch, 1), device=device, generator=torch.Generator(device=device).manual_seed(1))

    @torch.no_grad()
    def decode(count: int) -> None:
        nonlocal cache, token
        for _ in range(count):
            out = model(token, use_cache=True, **{CACHE_NAME: cache})
            cache, token = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)

    return decode


def timed_rate(decode: Callable[[int], None], steps: int, batch: int, device) -> float:
    """Tokens/s of `steps` steps of `decode` (greedy_steps'), from idle to done."""
    _synchronize(device)
    start = time.perf_counter()
    decode(steps)
    _synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def _decode_rates(model, cache, batch: int, vocab_size: int, device, warmup: int, steps: int,
                  repeats: int) -> list[float]:  # fmt: skip
    """Tokens/s (greedy steps per second times the batch) of each of `repeats` blocks of `steps`
    decode steps of `model` from `cache`, once warm (see the module docstring)."""
    decode = greedy_steps(model, cache, batch, vocab_size, device)

    def timed_block() -> float:
        return timed_rate(decode, steps, batch, device)

    decode(warmup)
    previous = timed_block()
    for _ in range(STABILIZING_BLOCKS - 1):
        current = timed_block()
        if abs(current - previous) <= STABLE * previous:
            break
        previous = current
    return [timed_block() for _ in range(repeats)]


def run(model, plan: Plan, batch: int, context: int, *, steps: int = 20, warmup: int = 20, repeats: int = 3,
        methods=METHODS, on_method: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Decode tokens/s of `model` under `plan` (see the module docstring) for each of `methods`.
    `on_method` is given the report so far after each method (a long run interrupted keeps them)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    shape = ModelShape.from_config(model.config)
    plan.validate(shape)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    rates, ranges, failures = {}, {}, {}
    step_bytes = _bytes_per_step(model, plan, shape, dtype, batch, context)

    def report() -> dict:
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
            "tokens_per_s": dict(rates),
            "tokens_per_s_min_max": dict(ranges),
            "speedup_vs_dense": {m: round(rates[m] / rates["dense"], 3) for m in rates} if "dense" in rates else {},
            "speedup_vs_fastest_stock": _speedup_vs_fastest_stock(rates),
            "bytes_per_step": {m: step_bytes[m] for m in rates},
            "gb_per_s": {m: round(step_bytes[m] * rates[m] / batch / 1e9, 1) for m in rates},
            "byte_ideal_speedup": round(step_bytes["dense"] / step_bytes["transformed"], 3),
            "failed": dict(failures),
        }

    captured = capture(model, shape) if {"dense-twin", "transformed"} & set(methods) else None
    for method in methods:
        print(f"throughput: {method} ...", file=sys.stderr, flush=True)
        try:
            blocks = _method_rates(method, model, plan, shape, batch, context, dtype, device, warmup, steps, repeats,
                                   captured)
            rates[method] = round(statistics.median(blocks), 1)
            ranges[method] = [round(min(blocks), 1), round(max(blocks), 1)]
            print(f"throughput: {method} {rates[method]} {ranges[method]} tokens/s", file=sys.stderr, flush=True)
        except torch.OutOfMemoryError as err:  # e.g. a compiled graph holds the old and new cache at once
            failures[method] = f"out of memory: {str(err).splitlines()[0]}"
        except Exception as err:  # one method's failure (a compiler's, say) leaves the others' numbers standing
            traceback.print_exc(file=sys.stderr)
            failures[method] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_method is not None:
            on_method(report())
    return report()


def _method_rates(method, model, plan, shape, batch, context, dtype, device, warmup, steps, repeats,
                  captured) -> list[float]:  # fmt: skip
    capacity = context + warmup + steps * (STABILIZING_BLOCKS + repeats)
    if method in ("transformed", "dense-twin"):
        method_plan = plan if method == "transformed" else keep_everything_plan(shape)
        runner = transform(model, method_plan, program=captured)
        cache = random_compressed_cache(method_plan, shape, batch, context, capacity, dtype, device)
    elif method in ("compiled", "compiled-own-graphs"):
        cuda_graphs = "kvcompile" if method == "compiled-own-graphs" else "inductor"
        runner, cache = compiled_on_static_cache(model, plan, batch, context, capacity, cuda_graphs)
    else:
        layers = random_dense_cache(shape, batch, context, dtype, device)
        if method == "static-compiled":
            runner, cache = _static_compiled(model, layers, capacity)
        else:
            runner, cache = model, dynamic_cache_holding([k for k, _ in layers], [v for _, v in layers])
        del layers
    return _decode_rates(runner, cache, batch, model.config.vocab_size, device, warmup, steps, repeats)


def _speedup_vs_fastest_stock(rates: dict[str, float]) -> dict[str, float]:
    """Each rate over the faster of the two stock transformers rows that ran (eager, compiled static)."""
    stock = [rates[m] for m in ("dense", "static-compiled") if m in rates]
    return {m: round(rate / max(stock), 3) for m, rate in rates.items()} if stock else {}


def keep_everything_plan(shape: ModelShape) -> Plan:
    """Every channel of every KV head, no windows: the compressed runtime over the dense cache."""
    every = list(range(shape.head_dim))
    return Plan.from_k_channels({layer: [every] * shape.num_kv_heads for layer in range(shape.num_layers)}, model=shape)


def _static_compiled(model, layers, capacity: int):
    """transformers' StaticCache holding `layers`, and a step function running the model compiled
    with mode="reduce-overhead" on it (positions from the cache's own count)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=capacity)
    batch, _, context, _ = layers[0][0].shape
    device = layers[0][0].device
    # one real update allocates each layer's static tensors; then the random context goes in place
    first = torch.zeros(batch, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(first, cache_position=torch.zeros(1, dtype=torch.long, device=device), **{CACHE_NAME: cache})
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.keys[:, :, :context] = keys
        layer.values[:, :, :context] = values
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    position = torch.tensor([context], device=device)

    def step(token, use_cache=True, **cache):
        out = compiled(token, cache_position=position, use_cache=use_cache, **cache)
        position.add_(1)
        return out

    return step, cache


def takes_cache_position(model) -> bool:
    """Does `model.forward` take `cache_position`? transformers before 5.2x computes a call's
    positions from the cache's count unless given it (later releases dropped the argument)."""
    return "cache_position" in inspect.signature(model.forward).parameters


def compiled_on_static_cache(model, plan: Plan, batch: int, context: int, capacity: int, cuda_graphs: str):
    """The plan's static compressed cache holding `context` random tokens per row, and a step running
    the model compiled by the kvcompile backend on it (on a GPU, CUDA graphs made by `cuda_graphs`)."""
    torch._dynamo.reset()
    device = next(model.parameters()).device
    cache = cache_for(model, plan, batch_size=batch, max_cache_len=capacity)
    cache.hold_random_tokens(context, torch.Generator(device=device).manual_seed(0))
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(model, backend="kvcompile", options={"mode": mode, "cuda_graphs": cuda_graphs},
                             fullgraph=True)
    position = torch.tensor([context], device=device)
    pass_cache_position = takes_cache_position(model)

    def step(token, use_cache=True, **cache):
        extra = {"cache_position": position} if pass_cache_position else {}
        out = compiled(token, position_ids=position[None].expand(batch, 1), use_cache=use_cache, **cache, **extra)
        position.add_(1)
        return out

    return step, cache


def _bytes_per_step(model, plan: Plan, shape: ModelShape, dtype, batch: int, context: int) -> dict[str, int]:
    """Bytes a decode step reads at `context` cached tokens: every weight once, and the cache."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_cache = keep_everything_plan(shape).cache_nbytes(shape, dtype, batch, context)
    planned = plan.cache_nbytes(shape, dtype, batch, context)
    dense = weights + dense_cache
    return {"dense": dense, "static-compiled": dense, "dense-twin": dense, "transformed": weights + planned,
            "compiled": weights + planned, "compiled-own-graphs": weights + planned}


def format_row(report: dict) -> str:
    rates, ranges, bandwidth = report["tokens_per_s"], report["tokens_per_s_min_max"], report["gb_per_s"]
    cells = "  ".join(f"{m} {rates[m]:.1f} [{ranges[m][0]:.1f}-{ranges[m][1]:.1f}] {bandwidth[m]:.0f} GB/s" +
                      (f" ({report['speedup_vs_dense'][m]:.2f}x)" if m != "dense" and report["speedup_vs_dense"] else "")
                      for m in rates)
    cells += "".join(f"  {m} failed ({why})" for m, why in report["failed"].items())
    return (f"{report['model']} {report['shape']['num_layers']}L, {report['dtype']}, batch {report['batch']} x "
            f"context {report['context']}, {report['device']}: tokens/s, median [min-max] of {report['repeats']} x "
        f"{report['steps']} steps, byte-ideal {report['byte_ideal_speedup']:.2f}x: {cells}")
