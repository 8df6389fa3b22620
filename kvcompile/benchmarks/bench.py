"""Decode-attention benchmark: dense SDPA vs our kernel on a dense cache vs our kernel on a LeanK cache.

Decode attention reads the whole KV cache once per token, so its speed is bytes over bandwidth.
The benchmark builds, layer by layer, the cache a published LeanK mask keeps for a Llama-3.1-8B
shaped model (32 query heads, 8 KV heads, head_dim 128, bf16): full-channel sink and recent
windows, a middle grouped by kept width, no middle K or V for streaming heads. It times one decode
step per layer for

- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention` on the dense cache (the baseline),
- ``dense``: our kernel on the dense cache (the whole sequence as one full-width window),
- ``leank``: our kernel on the compressed cache,

and a device-to-device copy in the same run, the bandwidth the kernels are held to. Bandwidth is
bytes of cache read / time (the copy: bytes read + written / time). A measurement is the median of
CUDA event timings after a warmup, averaged over the layers benchmarked; it is repeated `repeats`
times in one process and reported as the median with its min-max.

Each method is timed twice: called from Python (`ms`), and replayed from a CUDA graph of one call
(`graphed_ms`), the way decode steps run in serving engines. The difference is the host's launch
cost, which at small batch is larger than the kernels' own time.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# kept K channels per layer and KV head of LeanK's published Llama-3.1-8B-Instruct mask
LEANK_COUNTS = Path(__file__).parent / "data" / "leank_counts_llama31_8b.json"
CONFIGS = ((1, 32768), (1, 131072), (8, 32768), (64, 32768))  # (batch, context)
WARMUP, REPS, REPEATS = 10, 20, 3


@dataclass(frozen=True)
class BenchShape:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    sink: int = 128
    recent: int = 1024
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Result:
    batch: int
    context: int
    layers: int
    ms: dict[str, float] = field(default_factory=dict)  # per layer, median of the repeats
    graphed_ms: dict[str, float] = field(default_factory=dict)  # per layer, replayed from a CUDA graph
    ms_range: dict[str, list[float]] = field(default_factory=dict)  # min, max of the repeats
    graphed_ms_range: dict[str, list[float]] = field(default_factory=dict)
    bytes_read: dict[str, float] = field(default_factory=dict)  # per layer
    bandwidth_gbs: dict[str, float] = field(default_factory=dict)
    graphed_bandwidth_gbs: dict[str, float] = field(default_factory=dict)
    copy_gbs: float = 0.0

    def speedup(self, method: str, timings: str = "ms") -> float:
        ms = getattr(self, timings)
        return ms["sdpa"] / ms[method]


def load_counts(path: str | Path = LEANK_COUNTS) -> list[list[int]]:
    """Kept K channels per layer and KV head of the published Llama-3.1-8B LeanK mask."""
    return json.loads(Path(path).read_text())["kept_channels_per_layer_per_kv_head"]


def layer_inputs(counts: list[int], batch: int, context: int, shape: BenchShape, generator: torch.Generator):
    """The decode inputs of one layer: the query and its compressed and dense caches (random values;
    the kept channels are a random sorted subset of each head's)."""
    device, dtype, d = "cuda", shape.dtype, shape.head_dim
    window = shape.sink + shape.recent
    middle = max(0, context - window)

    def rand(*size):
        return torch.randn(*size, device=device, dtype=dtype, generator=generator)

    q = rand(batch, shape.num_heads, 1, d)
    widths = sorted({count for count in counts if count})
    heads = [torch.tensor([h for h, c in enumerate(counts) if c == w], device=device) for w in widths]
    channels = [
        torch.stack([torch.randperm(d, device=device, generator=generator)[:w].sort().values for _ in group])
        for w, group in zip(widths, heads)
    ]
    compressed = {
        "k_window": rand(batch, shape.num_kv_heads, window, d),
        "v_window": rand(batch, shape.num_kv_heads, window, d),
        "k_middle": [rand(batch, len(group), middle, w) for w, group in zip(widths, heads)],
        "heads": heads,
        "channels": channels,
        "v_middle": rand(batch, sum(1 for c in counts if c), middle, d),
    }
    return q, compressed


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    return sum(_nbytes(v) for v in value)


def time_ms(fn, warmup: int = WARMUP, reps: int = REPS) -> float:
    """Median milliseconds of `fn()` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_of(fn):
    """The replay of a CUDA graph of one `fn()` call (compiled and warmed first)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture wants a side stream's first use warmed up too
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # the stream warmed up, as the runtime captures
        fn()
    return graph.replay


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth, (read + written bytes) / time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6


def run_config(batch: int, context: int, counts: list[list[int]], shape: BenchShape, copy_gbs: float,
               repeats: int = REPEATS) -> Result:
    from kvcompile.kernels import triton_decode

    scale = shape.head_dim ** -0.5
    generator = torch.Generator(device="cuda").manual_seed(0)
    methods = ("sdpa", "dense", "leank")
    totals = {name: [[] for _ in range(repeats)] for name in methods}  # [repeat][layer]
    graphed = {name: [[] for _ in range(repeats)] for name in methods}
    bytes_read = {name: [] for name in methods}
    for layer_counts in counts:
        q, compressed = layer_inputs(layer_counts, batch, context, shape, generator)
        k = torch.randn(batch, shape.num_kv_heads, context, shape.head_dim, device="cuda", dtype=shape.dtype, generator=generator)
        v = torch.randn_like(k)
        runs = {
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
            "dense": lambda: triton_decode.dense_decode(q, k, v, scale),
            "leank": lambda: triton_decode.windowed_decode(q, compressed["k_window"], compressed["v_window"],
                                                           compressed["k_middle"], compressed["heads"],
                                                           compressed["channels"], compressed["v_middle"], scale,
                                                           shape.sink),
        }
        dense_bytes = k.nbytes + v.nbytes
        leank_bytes = _nbytes([compressed["k_window"], compressed["v_window"], compressed["k_middle"], compressed["v_middle"]])
        for name, fn in runs.items():
            replay = graph_of(fn)
            for repeat in range(repeats):  # interleaved, so a drifting clock shows as spread
                totals[name][repeat].append(time_ms(fn))
                graphed[name][repeat].append(time_ms(replay))
            bytes_read[name].append(leank_bytes if name == "leank" else dense_bytes)
        del q, compressed, k, v, runs
        torch.cuda.empty_cache()
    result = Result(batch, context, len(counts), copy_gbs=round(copy_gbs, 1))
    for name in methods:
        result.bytes_read[name] = statistics.mean(bytes_read[name])
        for timings, per_repeat in (("ms", totals[name]), ("graphed_ms", graphed[name])):
            layer_means = [statistics.mean(layers) for layers in per_repeat]
            getattr(result, timings)[name] = round(statistics.median(layer_means), 4)
            getattr(result, f"{timings}_range")[name] = [round(min(layer_means), 4), round(max(layer_means), 4)]
        result.bandwidth_gbs[name] = round(result.bytes_read[name] / result.ms[name] / 1e6, 1)
        result.graphed_bandwidth_gbs[name] = round(result.bytes_read[name] / result.graphed_ms[name] / 1e6, 1)
    return result


def run(configs=CONFIGS, layers: int | None = None, counts_path: str | Path = LEANK_COUNTS,
        repeats: int = REPEATS) -> dict:
    """The benchmark over `configs`; `layers` benchmarks that many of the mask's layers, evenly spread."""
    if not torch.cuda.is_available():
        raise RuntimeError("the decode benchmark needs a CUDA device")
    counts = load_counts(counts_path)
    if layers is not None:
        counts = [counts[i * len(counts) // layers] for i in range(layers)]
    shape = BenchShape()
    copy_gbs = copy_bandwidth_gbs()
    results = [run_config(batch, context, counts, shape, copy_gbs, repeats) for batch, context in configs]
    return {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": _triton_version()},
        "shape": {**asdict(shape), "dtype": str(shape.dtype)},
        "timing": {"warmup": WARMUP, "reps": REPS, "repeats": repeats},
        "results": [{**asdict(r), "speedup_vs_sdpa": {m: round(r.speedup(m), 3) for m in r.ms},
                     "share_of_copy_bandwidth": {m: round(r.bandwidth_gbs[m] / r.copy_gbs, 3) for m in r.ms},
                     "graphed_speedup_vs_sdpa": {m: round(r.speedup(m, "graphed_ms"), 3) for m in r.ms},
                     "graphed_share_of_copy_bandwidth": {m: round(r.graphed_bandwidth_gbs[m] / r.copy_gbs, 3)
                                                         for m in r.ms}}
                    for r in results],
    }


def format_table(report: dict) -> str:
    lines = [f"decode attention per layer, {report['device']}, bf16, Llama-3.1-8B heads (32 q / 8 kv / 128), "
             f"LeanK mask, sink {report['shape']['sink']} + recent {report['shape']['recent']} full",
             f"median of {report['timing']['repeats']} repeats, leank's min-max in brackets",
             f"{'batch x context':>16}  {'sdpa ms':>8}  {'dense ms':>8}  {'leank ms':>8}  {'leank min-max':>15}  "
             f"{'leank vs sdpa':>13}  "
             f"{'sdpa GB/s':>9}  {'dense GB/s':>10}  {'leank GB/s':>10}  {'copy GB/s':>9}  {'leank/copy':>10}"]
    for timings, label in (("", "called from Python"), ("graphed_", "replayed from CUDA graphs")):
        lines.append(f"-- {label}")
        for r in report["results"]:
            ms, bw = r[f"{timings}ms"], r[f"{timings}bandwidth_gbs"]
            lines.append(
                f"{r['batch']:>6} x {r['context']:<7}  {ms['sdpa']:>8.3f}  {ms['dense']:>8.3f}  {ms['leank']:>8.3f}  "
                f"{'%.3f-%.3f' % tuple(r[f'{timings}ms_range']['leank']):>15}  "
                f"{r[f'{timings}speedup_vs_sdpa']['leank']:>12.2f}x  {bw['sdpa']:>9.0f}  {bw['dense']:>10.0f}  "
                f"{bw['leank']:>10.0f}  {r['copy_gbs']:>9.0f}  {r[f'{timings}share_of_copy_bandwidth']['leank']:>10.0%}"
            )
    return "\n".join(lines)


def _triton_version() -> str:
    import triton

    return triton.__version__
