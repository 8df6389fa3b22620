"""The torch.compile backend `"kvcompile"`.

    cm = torch.compile(model, backend="kvcompile", options={"plan": plan})
    out = cm(ids, use_cache=True)
    out = cm(tok, past_key_values=out.past_key_values, use_cache=True)

Every graph dynamo captures from the model's forward (prefill and decode, the HF cache object's
updates inline) goes through `plan_attention_in_hf_graph`, then inductor. Decode attention then
scores with the plan's kept K channels, as `kvcompile.transform` does; the cache object stays the
model's own, with full-width keys (see the pass for why), so this backend gives the plan's outputs,
not its memory or bandwidth: `kvcompile.transform` and the ONNX export give those.

Options: `plan` (a `kvcompile.Plan` without merges or windows; required) and `inductor` (default
True; False runs the rewritten graphs as they are, which is quicker to compile).
"""

from __future__ import annotations

from importlib.metadata import entry_points

import torch
import torch.fx

import kvcompile.kernels  # noqa: F401  (registers the ops the rewritten graphs call)

from .pipeline import HF_GRAPH, run_stage
from .plan import Plan

BACKEND_NAME = "kvcompile"
ENTRY_POINT_GROUP = "torch_dynamo_backends"


def kvcompile_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None):
    """A dynamo backend: the plan's attention on `gm`, then inductor (see the module docstring)."""
    options = dict(options or {})
    plan = options.pop("plan", None)
    use_inductor = options.pop("inductor", True)
    if options:
        raise TypeError(f"unknown kvcompile backend options {sorted(options)}; expected 'plan' and 'inductor'")
    if not isinstance(plan, Plan):
        raise TypeError(
            "the kvcompile backend needs options={'plan': plan} with a kvcompile.Plan, got "
            f"{type(plan).__name__ if plan is not None else 'no plan'}"
        )
    gm = run_stage(HF_GRAPH, gm, plan)
    if not use_inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def register() -> None:
    """Make `backend="kvcompile"` resolvable. An installed kvcompile declares the backend as a
    `torch_dynamo_backends` entry point, which torch loads on first use (registering it here too
    would make that load fail as a duplicate); from a source tree, register it directly."""
    from torch._dynamo.backends import registry

    if entry_points(group=ENTRY_POINT_GROUP, name=BACKEND_NAME):
        return
    if BACKEND_NAME not in registry.list_backends(exclude_tags=()):
        registry.register_backend(kvcompile_backend, name=BACKEND_NAME)
