"""The torch.compile backend `"kvcompile"`.

    cache = kvcompile.cache_for(model, plan, batch_size=8, max_cache_len=33_000)
    cm = torch.compile(model, backend="kvcompile", mode="reduce-overhead")
    out = cm(ids, past_key_values=cache)          # the prompt, written to the compressed cache
    out = cm(tok, past_key_values=cache)          # decode steps, in place, replayed from CUDA graphs

Every graph dynamo captures from the model's forward goes through the HF_GRAPH stage, then
inductor. On a `StaticCompressedCache` (static_cache.py) each attention becomes the plan's: the
cache holds the plan's layout and decode reads only it, for every plan (pruned, windowed, merged).
The cache names its plan, so `options={"plan": plan}` may be left out; `mode` is inductor's.
A model called without such a cache makes transformers' DynamicCache, which keeps every channel:
there the backend needs the plan option, takes plans without merges or windows, and gives the
plan's outputs without its memory (passes/hf_graph_attention.py).

Options: `plan` (a `kvcompile.Plan`), `inductor` (default True; False runs the rewritten graphs as
they are, which is quicker to compile), `mode` (as torch.compile's, for when options are given:
torch.compile takes one of the two) and `cuda_graphs`: who makes the CUDA graphs a mode such as
"reduce-overhead" asks for, "inductor" (its CUDA graph trees, the default) or "kvcompile"
(graphs.ReplayedCalls, for every graph of static shapes whose inputs are all on the GPU, such as
the decode step; inductor's for the rest).
"""

from __future__ import annotations

from importlib.metadata import entry_points

import torch
import torch.fx

import kvcompile.kernels  # noqa: F401  (registers the ops the rewritten graphs call)

from .graphs import ReplayedCalls
from .growing_inputs import Feed, narrow_growing_inputs
from .passes.cache_sites import cache_site_plans
from .pipeline import HF_GRAPH, run_stage
from .plan import Plan, PlanError
from .static_cache import plan_of_cache

BACKEND_NAME = "kvcompile"
ENTRY_POINT_GROUP = "torch_dynamo_backends"
_OPTIONS = ("plan", "inductor", "mode", "cuda_graphs")
CUDA_GRAPHS = ("inductor", "kvcompile")


def kvcompile_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None,
                      mode: str | None = None):
    """A dynamo backend: the plan's attention on `gm`, then inductor (see the module docstring)."""
    options = dict(options or {})
    plan = options.pop("plan", None)
    use_inductor = options.pop("inductor", True)
    mode = options.pop("mode", mode)
    cuda_graphs = options.pop("cuda_graphs", "inductor")
    if cuda_graphs not in CUDA_GRAPHS:
        raise ValueError(f"kvcompile backend option cuda_graphs={cuda_graphs!r}: expected one of {list(CUDA_GRAPHS)}")
    if options:
        raise TypeError(f"unknown kvcompile backend options {sorted(options)}; expected some of {list(_OPTIONS)}")
    if plan is None:
        plan = _plan_of_the_cache(gm)
    if not isinstance(plan, Plan):
        raise TypeError(
            "the kvcompile backend needs options={'plan': plan} with a kvcompile.Plan, or a model running on "
            "past_key_values=kvcompile.cache_for(model, plan, ...), got "
            f"{type(plan).__name__ if plan is not None else 'no plan'}"
        )
    static = static_inputs(gm, example_inputs) if cuda_graphs == "kvcompile" else None  # dynamo's graph, as it came
    gm = run_stage(HF_GRAPH, gm, plan)
    narrowed = narrow_growing_inputs(gm, example_inputs)  # a decode step under generate: its mask's tail
    feed = None
    if narrowed is not None:
        gm, feed = narrowed
        example_inputs = feed(example_inputs)
        static = static and [static[i] and index is None for i, index in feed.sources]
    if use_inductor:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(mode) if mode else {}
        replayed = (cuda_graphs == "kvcompile" and patches.get("triton.cudagraphs", False)
                    and _replayable(gm, example_inputs, static))
        if replayed:
            patches = {**patches, "triton.cudagraphs": False}
        compiled = compile_fx(gm, example_inputs, config_patches=patches or None)
        if replayed:
            compiled = ReplayedCalls(compiled, static)
    else:
        compiled = gm.forward
    return compiled if feed is None else _Fed(compiled, feed)


class _Fed:
    """A graph whose growing inputs were narrowed (growing_inputs.py), called with dynamo's inputs."""

    def __init__(self, fn, feed: Feed):
        self.fn, self.feed = fn, feed

    def __call__(self, *inputs):
        return self.fn(*self.feed(inputs))


def static_inputs(gm: torch.fx.GraphModule, example_inputs: list) -> list[bool] | None:
    """Per input of dynamo's graph `gm`: does it keep its address from call to call (a weight, a
    buffer, a tensor marked with `torch._dynamo.mark_static_address`, as the cache's are)? None
    where the placeholders do not match the inputs."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    static = []
    for node, value in zip(placeholders, example_inputs):
        marked = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
        static.append(isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter) or marked is not None
                      or getattr(value, "_dynamo_static_input_type", None) is not None))
    return static


def _replayable(gm: torch.fx.GraphModule, example_inputs: list, static: list[bool] | None) -> bool:
    """Can kvcompile replay graph `gm` from CUDA graphs: static shapes, every input on a GPU, no gradients."""
    shapes = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
    return (
        static is not None
        and all(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
        and all(t is None or isinstance(t, torch.Tensor) and all(isinstance(size, int) for size in t.shape)
                for t in shapes)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in example_inputs))
    )


def _plan_of_the_cache(gm: torch.fx.GraphModule) -> Plan | None:
    fingerprints = cache_site_plans(gm)
    if len(fingerprints) > 1:
        raise PlanError(f"this graph reads caches of several plans ({sorted(fingerprints)}); one model runs one plan")
    if not fingerprints:
        return None
    fingerprint = fingerprints.pop()
    plan = plan_of_cache(fingerprint)
    if plan is None:
        raise PlanError(f"the graph reads a StaticCompressedCache of plan {fingerprint}, which no live cache holds: "
                        "pass options={'plan': plan}")
    return plan


def register() -> None:
    """Make `backend="kvcompile"` resolvable. An installed kvcompile declares the backend as a
    `torch_dynamo_backends` entry point, which torch loads on first use (registering it here too
    would make that load fail as a duplicate); from a source tree, register it directly."""
    from torch._dynamo.backends import registry

    if entry_points(group=ENTRY_POINT_GROUP, name=BACKEND_NAME):
        return
    if BACKEND_NAME not in registry.list_backends(exclude_tags=()):
        registry.register_backend(kvcompile_backend, name=BACKEND_NAME)
