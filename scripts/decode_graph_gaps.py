"""Where a decode step's time goes inside its CUDA graph: kernel time and the idle time between kernels.

    python scripts/decode_graph_gaps.py --out gaps/ --layers 8 --batch 1 --context 32768    # a CUDA machine

`transformed` (graphs.GraphedDecode) and the backend's `compiled-own-graphs` (graphs.ReplayedCalls;
`-alternating`: two captures of its step replayed in turn, to see whether relaunching a graph still
running is what costs) run the same model, plan and cache shapes as `kvcompile throughput` (the
random Llama-3.1-8B-shaped model, `--layers` of its layers, under the LeanK counts); the compiled
step runs fewer kernels and less kernel time yet is slower, the GPU idle longer between its
replays (README, torch.compile backend). Per method this decodes until warm, times blocks of
steps, profiles `--steps` more, and writes under OUT: `<method>.trace.json` (torch.profiler's),
`<method>.graphN.dot` (each graph captured, `CUDAGraph.debug_dump`: its nodes and their launch
parameters, to compare the graphs node by node) and `gaps.json`: per method the step's kernel
time, the idle time between kernels, the pairs of kernels with the most idle time between them,
how long the host takes to issue a step, the CUDA runtime calls per step that may wait
(synchronize, copy, query), and the time of the step's graph replayed alone, back to back.
"""

import argparse
import collections
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from kvcompile import backend, graphs
from kvcompile.benchmarks import throughput
from kvcompile.capture import capture
from kvcompile.plan import ModelShape
from kvcompile.runtime import transform

METHODS = ("transformed", "compiled-own-graphs", "compiled-own-graphs-alternating")
STEP_GAP_US = 50.0  # a longer idle time is between steps (the host's next call), not inside one


class _DebugGraph(torch.cuda.CUDAGraph):
    """A CUDAGraph that writes what it captured as DOT (`debug_dump`) as soon as the capture ends,
    to `dump_to`<n>.dot (n: its number among those captured): debug mode is switched on as the
    capture begins (on the constructed graph), and the captured graph is freed once instantiated.
    graphs.py makes its graphs as torch.cuda.CUDAGraph(), so this class stands in for it here."""

    made: list["_DebugGraph"] = []
    dump_to = ""  # a path prefix; set per method

    def capture_begin(self, *args, **kwargs) -> None:
        self.enable_debug_mode()
        _DebugGraph.made.append(self)
        super().capture_begin(*args, **kwargs)

    def capture_end(self) -> None:
        super().capture_end()
        self.debug_dump(f"{_DebugGraph.dump_to}{_DebugGraph.made.index(self)}.dot")


class _AlternatingReplays(graphs.ReplayedCalls):
    """ReplayedCalls replaying two captures of each step in turn, over the same inputs: does the
    compiled step wait between replays because a graph is launched again while its previous launch
    still runs?"""

    def _run_and_capture(self, inputs):
        outputs, replay = super()._run_and_capture(inputs)
        if replay is None:
            return outputs, None
        again = torch.cuda.CUDAGraph()
        with torch.cuda.graph(again, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            captured = self._run(replay.inputs)
        return outputs, [replay, graphs._Replay(again, replay.inputs, captured)]

    def _replay(self, pair, inputs):
        pair.reverse()
        return super()._replay(pair[0], inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3, help="steps profiled")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.cuda.CUDAGraph = _DebugGraph

    model = throughput.llama_8b_shaped(num_layers=args.layers)
    shape = ModelShape.from_config(model.config)
    plan = throughput.leank_mask_plan(shape)
    capacity = args.context + 1000
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "batch": args.batch, "context": args.context}
    for method in args.methods:
        _DebugGraph.dump_to = str(args.out / f"{method}.graph")
        if method == "transformed":
            runner = transform(model, plan, program=capture(model, shape))
            cache = throughput.random_compressed_cache(plan, shape, args.batch, args.context, capacity,
                                                       torch.bfloat16, model.device)
        else:
            backend.ReplayedCalls = _AlternatingReplays if method.endswith("alternating") else graphs.ReplayedCalls
            runner, cache = throughput.compiled_on_static_cache(model, plan, args.batch, args.context, capacity,
                                                                 "kvcompile")
        decode = throughput.greedy_steps(runner, cache, args.batch, model.config.vocab_size, model.device)
        decode(12)
        rates = [throughput.timed_rate(decode, 20, args.batch, model.device) for _ in range(5)]
        host = {**_host_share(decode, 20), "bare_replay_us": _bare_replay_us(_DebugGraph.made[-1], 20)}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            decode(args.steps)
            torch.cuda.synchronize()
        trace = args.out / f"{method}.trace.json"
        profile.export_chrome_trace(str(trace))
        report[method] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_min_max": [min(rates), max(rates)],
                          **host, **_gaps(trace, args.steps)}
        print(method, json.dumps({k: v for k, v in report[method].items() if k != "idlest_pairs"}), flush=True)
        del runner, cache, decode
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    (args.out / "gaps.json").write_text(json.dumps(report, indent=1))


def _host_share(decode, steps: int) -> dict:
    """How long the host takes to issue `steps` steps and how long they take in all (µs per step):
    equal when the host waits for the GPU every step (a synchronizing call) or cannot keep ahead."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    decode(steps)
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {"host_issue_us_per_step": (issued - start) / steps * 1e6, "step_us": (done - start) / steps * 1e6}


def _bare_replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """µs per replay of a step's graph alone, back to back: no per-step copies, output, or next token
    (the replays write the same slots again, which only times them)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays * 1e6


def _gaps(trace: Path, steps: int) -> dict:
    """Per step: kernels, kernel time and idle time between them (µs), and the kernel pairs with the most."""
    events = json.loads(trace.read_text())["traceEvents"]
    waits = collections.Counter(e["name"] for e in events if e.get("cat") == "cuda_runtime" and
                                any(word in e["name"] for word in ("Synchronize", "Memcpy", "Query")))
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    inside = [(b["ts"] - a["ts"] - a["dur"], a["name"], b["name"]) for a, b in zip(kernels, kernels[1:])
              if b["ts"] - a["ts"] - a["dur"] < STEP_GAP_US]
    by_pair = collections.defaultdict(list)
    for gap, before, after in inside:
        by_pair[(before[:80], after[:80])].append(gap)
    idlest = sorted(by_pair.items(), key=lambda item: -sum(item[1]))[:20]
    return {
        "runtime_waits_per_step": {name: count / steps for name, count in waits.items()},
        "kernels_per_step": len(kernels) / steps,
        "kernel_us_per_step": sum(e["dur"] for e in kernels) / steps,
        "idle_us_per_step": sum(gap for gap, _, _ in inside) / steps,
        "median_idle_us": statistics.median(gap for gap, _, _ in inside) if inside else None,
        "idlest_pairs": [
            {"before": a, "after": b, "count": len(g), "idle_us": sum(g), "median_us": statistics.median(g)}
            for (a, b), g in idlest
        ],
    }


if __name__ == "__main__":
    main()
