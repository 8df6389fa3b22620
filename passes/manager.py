"""Run a stage: a sequence of passes over one program, checking the graph after each."""

from __future__ import annotations

from typing import Callable, Sequence

import torch.fx

from kvcompile.plan import Plan

# Every pass takes the program and the plan (passes that need no plan ignore it) and returns the
# program, rewritten in place.
Pass = Callable[[torch.fx.GraphModule, Plan], torch.fx.GraphModule]


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        self.passes = tuple(passes)

    def __call__(self, gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
        for p in self.passes:
            gm = p(gm, plan)
            gm.graph.lint()
            gm.recompile()
        return gm
