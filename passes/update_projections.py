"""Apply a plan's low-rank updates (plan.py's LayerUpdate, trained by healing) to the attention
projections of its layers: each updated linear layer reads W + b @ a, a new constant of the
program, in place of the user's W. Runs before the merge and pruning passes, which then fold and
prune the updated weights as they would the model's own."""

from __future__ import annotations

import torch.fx

from kvcompile.plan import Plan

from .graph import PassError
from .projections import fetch, projection_weights, swap_parameter
from .sites import find_attention_sites


def update_projections(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    for site in find_attention_sites(gm):
        update = plan.updates.get(site.layer)
        if update is None:
            continue
        for weight in projection_weights(gm, site):
            deltas = {name: update.delta(name) for name in weight.parts if name in update.factors}
            if not deltas:
                continue
            tensor = fetch(gm, weight.linear.args[1].target)
            shapes = weight.part_shapes(tensor)
            for name, delta in deltas.items():
                if tuple(delta.shape) != shapes[name]:
                    raise PassError(f"layer {site.layer} ({site.module_path}), field updates: the {name} update is "
                                    f"{tuple(delta.shape)}, the model's {name} projection weight {shapes[name]}")
            swap_parameter(gm, weight.linear, 1, weight.with_deltas(tensor, deltas), "updated")
    return gm
