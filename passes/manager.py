"""Run a sequence of passes, checking the graph after each and recording what ran."""

from __future__ import annotations

from typing import Callable, Sequence

import torch.fx

Pass = Callable[[torch.fx.GraphModule], torch.fx.GraphModule]
APPLIED_KEY = "kvcompile.passes"


def pass_name(p: Pass) -> str:
    func = getattr(p, "func", p)  # functools.partial
    return getattr(func, "__name__", type(func).__name__)


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def __call__(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for p in self.passes:
            gm = p(gm)
            gm.graph.lint()
            gm.recompile()
            gm.meta.setdefault(APPLIED_KEY, []).append(pass_name(p))
        return gm
