"""The rows an evaluation compares: the dense model, the K-channel baselines at each sparsity (random
channels and the static |q|·|k| ranking, calibrated on the calibration text), the user's plans, and
windowed variants. `kvcompile eval` and `kvcompile demo` are `evaluate(model, tokenizer,
evaluation_methods(...))`."""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

import torch

from kvcompile.calibration.calibrate import random_k_plan, static_k_plans
from kvcompile.calibration.recipe import Recipe
from kvcompile.plan import ModelShape, Plan

from .evaluate import Method
from .text import calibration_text

BASELINES = ("static", "random")


def evaluation_methods(
    model: torch.nn.Module,
    tokenizer,
    *,
    sparsities: Sequence[float] = (),
    baselines: Iterable[str] = BASELINES,
    align: int = 16,
    calib_tokens: int = 8192,
    baseline_windows: tuple[int, int] = (0, 0),
    plans: Sequence[tuple[str, Plan]] = (),
    windows: tuple[int, int] | None = None,
    program: torch.fx.GraphModule | None = None,
    progress: bool = True,
) -> list[Method]:
    """`dense`, then `random-kN%` and `static-kN%` per sparsity, then `plan:NAME` per plan; with
    `windows=(sink, recent)` each K-channel row once without windows and once with these.

    The baselines keep all channels of `baseline_windows=(sink, recent)` tokens (named `+wSINK/RECENT`),
    so that they compare fairly with plans that do. The static ranking is measured once for all
    sparsities. Rows are named by the sparsity their aligned counts achieve (printed to stderr where
    that differs from the asked one). `program`, from `kvcompile.capture(model)`, saves tracing again."""
    baselines = tuple(baselines)
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; expected some of {BASELINES}")
    shape = ModelShape.from_config(model.config)
    sink, recent = baseline_windows
    static = [None] * len(sparsities)
    if "static" in baselines and sparsities:
        recipe = Recipe(align=align, calib_tokens=calib_tokens, sink=sink, recent=recent)
        static = static_k_plans(model, recipe, sparsities, [calibration_text()], tokenizer=tokenizer, progress=progress,
                                program=program)
    suffix = f"+w{sink}/{recent}" if sink or recent else ""
    methods = [Method("dense")]
    for sparsity, static_plan in zip(sparsities, static):
        random_plan = random_k_plan(shape, sparsity, align, seed=0).with_windows(sink, recent)
        # the static plan's too: how many channels are kept in all depends on the sparsity and alignment only
        achieved = _achieved_sparsity(random_plan, shape)
        if abs(achieved - sparsity) > 1e-9:
            print(f"sparsity {sparsity:g} at align {align} keeps {1 - achieved:.1%} of the K channels", file=sys.stderr)
        if "random" in baselines:
            methods.append(Method(f"random-k{achieved:.0%}{suffix}", random_plan))
        if static_plan is not None:
            methods.append(Method(f"static-k{achieved:.0%}{suffix}", static_plan))
    methods += [Method(f"plan:{name}", plan) for name, plan in plans]
    if windows is not None:
        methods = [variant for method in methods for variant in with_and_without_windows(method, *windows)]
    return methods


def _achieved_sparsity(plan: Plan, shape: ModelShape) -> float:
    """The share of the model's K channels `plan` drops (its aligned counts may miss the asked share)."""
    kept = sum(sum(plan.kept_counts(layer)) for layer in plan.k_channels)
    return 1 - kept / (shape.num_layers * shape.num_kv_heads * shape.head_dim)


def with_and_without_windows(method: Method, sink: int, recent: int) -> list[Method]:
    """A K-channel row without windows and with `sink`/`recent` ones; other rows as they are."""
    plan = method.plan
    if plan is None or not plan.k_channels:
        return [method]
    name = method.name.removesuffix(f"+w{plan.sink}/{plan.recent}") if plan.windowed else method.name
    return [Method(name, plan.with_windows(0, 0)), Method(f"{name}+w{sink}/{recent}", plan.with_windows(sink, recent))]
