"""What the trainers of calibration share (LeanK's channel factors, healing's merge maps): the
learning-rate schedule, programs whose attention sites run trainable modules, and checkpoints that
resume a run exactly.

A checkpoint is a directory of two files, written like a plan (stores.py): `state.safetensors`
(the trained tensors by name and, per tensor, AdamW's moments `{name}.exp_avg`/`{name}.exp_avg_sq`)
and `state.json` (the run's fingerprint, the tensors' SHA-256, AdamW's step count and the trainer's
own fields). No pickle: a checkpoint of another run, or a half-written one, is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.fx

from kvcompile.passes import find_attention_sites
from kvcompile.passes.sites import AttentionSite
from kvcompile.program import clone_program
from kvcompile.stores import read_json, read_tensors, tensors_bytes, write_atomically, write_json

from .recipe import RecipeError

_STATE_JSON, _STATE_TENSORS = "state.json", "state.safetensors"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def warmup_decay(step: int, steps: int, warmup: float) -> float:
    """The learning rate's factor at `step` of `steps`: rising linearly over the first `warmup`
    share of the steps, then falling linearly to 0."""
    rise = max(1, math.ceil(warmup * steps))
    if step < rise:
        return (step + 1) / rise
    return max(0.0, (steps - step) / max(1, steps - rise))


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of a run's settings (JSON-able; tuples as lists): what a checkpoint must agree on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]


def with_attention_modules(program: torch.fx.GraphModule,
                           module_for: Callable[[AttentionSite], torch.nn.Module | None]) -> torch.fx.GraphModule:
    """A copy of `program` whose `kvcompile::attention` nodes call `module_for(site)` with the same
    arguments instead, for the sites it gives a module; parameters stay shared with `program`."""
    gm = clone_program(program)
    for site in find_attention_sites(gm):
        module = module_for(site)
        if module is None:
            continue
        name = f"trained_attention_{site.layer}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(site.attention):
            replacement = gm.graph.call_module(name, site.attention.args, site.attention.kwargs)
        site.attention.replace_all_uses_with(replacement)
        gm.graph.erase_node(site.attention)
    gm.recompile()
    return gm


def is_count(value: Any, most: int | None = None) -> bool:
    """Whether `value` (read from JSON) is an int in [0, most]."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value and (most is None or value <= most)


class Checkpoint:
    """Named trained tensors with their AdamW state, and the trainer's fields, in `directory`."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint

    @property
    def state_path(self) -> Path:
        return self.directory / _STATE_JSON

    def save(self, tensors: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, fields: Mapping[str, Any]) -> None:
        """The tensors, then the JSON recording their digest, each replaced in one rename (stores.py):
        interrupted between the two, the pair is refused at restore, never resumed mismatched."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stored, steps = {}, 0
        for name, tensor in tensors.items():
            stored[name] = tensor.detach().cpu().contiguous()
            state = optimizer.state.get(tensor, {})
            stored.update({f"{name}.{moment}": state[moment].cpu().contiguous() for moment in _MOMENTS if moment in state})
            steps = int(state["step"]) if "step" in state else steps
        data, digest = tensors_bytes(stored)
        write_atomically(self.directory / _STATE_TENSORS, data)
        write_json(self.state_path, {"fingerprint": self.fingerprint, "tensors_sha256": digest,
                                     "optimizer_steps": steps, **fields})

    def restore(self, tensors: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict | None:
        """Load a saved state into `tensors` (in place) and `optimizer`; the trainer's fields saved
        with it (for the trainer to check), or None when the directory holds no state."""
        if not self.state_path.exists():
            return None
        document = read_json(self.state_path, RecipeError)
        if not isinstance(document, dict) or document.get("fingerprint") != self.fingerprint:
            raise RecipeError(f"checkpoint {self.directory} is from another model or recipe; use a fresh directory")
        steps = document.get("optimizer_steps")
        if not is_count(steps) or not isinstance(document.get("tensors_sha256"), str):
            raise RecipeError(f"{self.state_path}: not a state this run wrote (optimizer steps {steps!r}); "
                              "use a fresh directory")
        path = self.directory / _STATE_TENSORS
        stored = read_tensors(path, document["tensors_sha256"], RecipeError)
        for name, tensor in tensors.items():
            names = [name, *(f"{name}.{moment}" for moment in _MOMENTS if steps)]
            for stored_name in names:
                if stored_name not in stored or stored[stored_name].shape != tensor.shape:
                    raise RecipeError(f"{path}: no tensor {stored_name!r} of shape {tuple(tensor.shape)}; "
                                      "use a fresh directory")
            with torch.no_grad():
                tensor.copy_(stored[name])
            if steps:
                optimizer.state[tensor] = {"step": torch.tensor(float(steps)),
                                           **{moment: stored[f"{name}.{moment}"].to(tensor.device) for moment in _MOMENTS}}
        return {key: value for key, value in document.items()
                if key not in ("fingerprint", "tensors_sha256", "optimizer_steps")}
