"""What to calibrate: a `Recipe`, checked against the model before any work is done."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcompile.plan import ModelShape

MERGE_METHODS = ("svd", "mean-pool")
K_METHODS = ("static-qk", "leank")


class RecipeError(ValueError):
    """Calibration settings that cannot produce a plan for this model."""


@dataclass(frozen=True)
class LeanKTraining:
    """LeanK training (leank.py). Steps are per stage; data are `tasks` x `lengths` prompts, one per step."""

    stage1_steps: int = 200
    stage2_steps: int = 200
    lr: float = 0.03
    l1: float = 0.06  # stage-1 penalty on mean(s), LeanK's value
    warmup: float = 0.1  # share of a stage's steps with a linearly rising learning rate
    lengths: tuple[int, ...] = (1024, 2048)
    tasks: tuple[str, ...] = ("passkey", "multikey")
    seed: int = 1  # the data seed; evaluation seeds differ
    checkpoint_every: int = 50

    def check(self) -> None:
        if self.stage1_steps < 0 or self.stage2_steps < 1:
            raise RecipeError("leank: stage1_steps must be >= 0 and stage2_steps >= 1")
        if not self.lengths or min(self.lengths) < 64:
            raise RecipeError(f"leank: lengths must be >= 64 tokens, got {self.lengths}")
        from kvcompile.evaluation.tasks import TASKS  # the task generator loads only for LeanK recipes

        for task in self.tasks:
            if task not in TASKS:
                raise RecipeError(f"leank: unknown task {task!r}; expected one of {TASKS}")


@dataclass(frozen=True)
class Recipe:
    """What to calibrate. Merging and channel pruning compose: heads are merged first.

    kv_group_size/kv_heads_per_group: each group of t contiguous KV heads becomes s heads' worth
    (one KV head of s·head_dim channels). rope: "commute" (folded into the weights, a plain GQA
    model) or "post" (projections after RoPE at run time); models without RoPE always fold.
    merge_layers: the layers to merge (None: all). k_sparsity/align: K-channel pruning, by the
    static |q|.|k| ranking (k_method "static-qk") or learned (k_method "leank", trained with
    `leank` settings); sink/recent: tokens at the start and end of the context whose keys keep
    every channel (LeanK's windows).
    """

    kv_group_size: int | None = None
    kv_heads_per_group: int = 1
    rope: str = "commute"
    merge_layers: tuple[int, ...] | None = None
    merge_method: str = "svd"
    k_sparsity: float | None = None
    align: int | None = None  # None: 32, or head_dim / 4 when smaller (16 for head_dim 64)
    k_method: str = "static-qk"
    sink: int = 0
    recent: int = 0
    leank: LeanKTraining = field(default_factory=LeanKTraining)
    calib_tokens: int = 8192
    chunk_tokens: int = 512

    def align_for(self, shape: ModelShape) -> int:
        """Kept channels per head are a multiple of this."""
        return self.align if self.align is not None else max(1, min(32, shape.head_dim // 4))

    def check(self, shape: ModelShape) -> None:
        if self.kv_group_size is None and self.k_sparsity is None:
            raise RecipeError("the recipe asks for nothing: set kv_group_size (merging) and/or k_sparsity (pruning)")
        if self.kv_group_size is not None:
            t, s = self.kv_group_size, self.kv_heads_per_group
            if t < 2 or shape.num_kv_heads % t:
                raise RecipeError(f"kv_group_size must be >= 2 and divide the model's {shape.num_kv_heads} KV heads, got {t}")
            if not 1 <= s < t:
                raise RecipeError(f"kv_heads_per_group must be in 1..{t - 1} for groups of {t}, got {s}")
            if self.rope not in ("commute", "post"):
                raise RecipeError(f"rope must be 'commute' or 'post', got {self.rope!r}")
            if self.merge_method not in MERGE_METHODS:
                raise RecipeError(f"merge_method must be one of {MERGE_METHODS}, got {self.merge_method!r}")
            if self.merge_method == "mean-pool" and s != 1:
                raise RecipeError("merge_method 'mean-pool' makes one head per group: kv_heads_per_group must be 1")
            for layer in self.merge_layers or ():
                if not 0 <= layer < shape.num_layers:
                    raise RecipeError(f"merge_layers: layer {layer} out of range 0..{shape.num_layers - 1}")
        if self.k_sparsity is not None:
            if not 0 <= self.k_sparsity < 1:
                raise RecipeError(f"k_sparsity must be in [0, 1), got {self.k_sparsity}")
            align = self.align_for(shape)
            if align < 1 or shape.head_dim % align:
                raise RecipeError(f"align must be a positive divisor of head_dim {shape.head_dim}, got {align}")
            if self.k_method not in K_METHODS:
                raise RecipeError(f"k_method must be one of {K_METHODS}, got {self.k_method!r}")
            if self.sink < 0 or self.recent < 0:
                raise RecipeError(f"sink and recent must be >= 0, got sink={self.sink}, recent={self.recent}")
            sliding = [layer for layer in range(shape.num_layers) if shape.window(layer) is not None]
            if (self.sink or self.recent) and sliding:
                raise RecipeError(f"sink/recent windows apply to global layers only, and layers {sliding} attend sliding "
                                  "windows: calibrate with sink=0 and recent=0 (a sliding layer keeps its own window)")
            if self.k_method == "leank":
                if self.kv_group_size is not None:
                    raise RecipeError("k_method 'leank' does not learn on merged heads yet: merge and learn in two plans")
                self.leank.check()
        if self.calib_tokens < 1 or self.chunk_tokens < 2:
            raise RecipeError("calib_tokens must be >= 1 and chunk_tokens >= 2")
