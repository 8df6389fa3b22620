"""Calibration: plans from activation statistics of real text.

`calibrate(model, recipe, texts)` turns a `Recipe` into a `Plan`:

- **KV-head merging** (recipe.kv_group_size): per layer, the uncentred second moments of the
  post-RoPE keys and of the values of every group of heads give `down`/`up` maps (bases.py):
  SVD for values and for `rope="post"` keys, per-frequency complex PCA for `rope="commute"` keys
  (it commutes with RoPE, so it folds into the weights), the same SVD folded for models without
  RoPE, or the paper's mean-pooling baseline.
- **Static K-channel pruning** (recipe.k_sparsity), recipe "static-qk": a post-RoPE key channel c
  of a KV head contributes `q_c * k_c` to every score, so it is ranked by mean|q_c| * mean|k_c|,
  |q_c| averaged over the KV head's GQA group; each head keeps its top channels, an aligned count,
  the counts together meeting the sparsity (`kept_channel_counts`).
  When the recipe also merges, the channels are ranked on the merged program: merge first.

The statistics come from the compiler's own view of the model: the canonical program (merged, if
the plan merges) is interpreted and the q/k/v inputs of every `kvcompile::attention` node are
accumulated as they pass (running sums, never the activations), so what is measured is exactly
what the passes later rewrite, for any architecture that captures.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.fx
from tqdm import tqdm

from kvcompile.capture import capture, program_for
from kvcompile.passes import find_attention_sites
from kvcompile.pipeline import canonical_program
from kvcompile.plan import LayerMerge, ModelShape, Plan
from kvcompile.program import call_program, empty_entries, signature_of
from kvcompile.rope import RopeLayout

from . import bases, leank
from .recipe import Recipe, RecipeError

METHOD = "static-qk"
_NO_PLAN = Plan.from_k_channels({})  # the dense model's programs


def kept_channel_counts(head_scores: Sequence[torch.Tensor], sparsity: float, align: int) -> list[int]:
    """Kept channels per head (one score vector per head, any layers): the aligned share `1 - sparsity`.

    The total is `(1 - sparsity)` of all channels rounded to the nearest multiple of `align`, so a
    sparsity the alignment cannot give per head (70% of 64 channels at align 16) is still met
    exactly over the model. Counts are as even as the alignment allows: every head keeps the
    aligned count below its share, and the units left over go to the heads whose next `align`
    channels carry the largest share of their score. A head never keeps fewer than `align`: a
    ranking of channels is no evidence that a head may stream.
    """
    if not 0 <= sparsity < 1:
        raise RecipeError(f"sparsity must be in [0, 1), got {sparsity}")
    head_dim = head_scores[0].numel()
    if align < 1 or head_dim % align:
        raise RecipeError(f"align must be a positive divisor of head_dim {head_dim}, got {align}")
    heads, units_per_head = len(head_scores), head_dim // align
    total = min(max(int(heads * head_dim * (1 - sparsity) / align + 0.5), heads), heads * units_per_head)
    base = max(total // heads, 1)
    counts = [base] * heads
    if total > base * heads:
        # gain of a head's next unit: its share of the head's score mass, channels taken best first
        ranked = torch.stack([s.double().sort(descending=True).values for s in head_scores])
        shares = ranked / ranked.sum(dim=1, keepdim=True).clamp_min(1e-30)
        gains = shares[:, base * align : (base + 1) * align].sum(dim=1)
        for head in gains.argsort(descending=True, stable=True)[: total - base * heads].tolist():
            counts[head] += 1
    return [units * align for units in counts]


def calibrate(
    model: torch.nn.Module,
    recipe: Recipe,
    texts: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor,
    *,
    tokenizer=None,
    progress: bool = True,
    program: torch.fx.GraphModule | None = None,
    checkpoint_dir: str | Path | None = None,
) -> Plan:
    """A plan for `model` from `recipe`, measured on `texts` (strings with `tokenizer`, or token ids).

    `program`, from `kvcompile.capture(model)`, saves tracing the model again. A LeanK recipe
    learns from retrieval prompts over `texts` (strings) and, with `checkpoint_dir`, saves its
    state there as it goes and resumes from it.
    """
    if recipe.k_method == "leank" and recipe.k_sparsity is not None:
        shape = ModelShape.from_config(model.config)
        recipe.check(shape)
        check_weights_finite(model)
        canonical = canonical_program(program_for(model, program, shape), _NO_PLAN)
        return _learned_plan(canonical, shape, recipe, texts, tokenizer, checkpoint_dir, progress)
    return _measured_plans(model, recipe, [recipe.k_sparsity], texts, tokenizer, progress, program)[0]


def static_k_plans(
    model: torch.nn.Module,
    recipe: Recipe,
    sparsities: Sequence[float],
    texts: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor,
    *,
    tokenizer=None,
    progress: bool = True,
    program: torch.fx.GraphModule | None = None,
) -> list[Plan]:
    """`calibrate(model, replace(recipe, k_sparsity=s), texts)` for each of `sparsities`, from one pass
    over `texts`: the channel scores do not depend on the sparsity, only where the ranking is cut."""
    if recipe.k_method != METHOD:
        raise RecipeError(f"static_k_plans ranks channels by |q|.|k| (k_method {METHOD!r}); learned plans are "
                          "trained one sparsity at a time (calibrate)")
    if not sparsities:
        raise RecipeError("static_k_plans: no sparsities given")
    return _measured_plans(model, recipe, sparsities, texts, tokenizer, progress, program)


def _measured_plans(model, recipe: Recipe, sparsities, texts, tokenizer, progress, program) -> list[Plan]:
    """The plans of `recipe` at each of `sparsities` (None: no K pruning), with merges and channel
    scores measured once for all of them."""
    shape = ModelShape.from_config(model.config)
    for sparsity in sparsities:
        replace(recipe, k_sparsity=sparsity).check(shape)
    check_weights_finite(model)
    captured = program_for(model, program, shape)
    canonical = canonical_program(captured, _NO_PLAN)
    chunks = calibration_chunks(texts, tokenizer, recipe.calib_tokens, recipe.chunk_tokens)
    check_token_ids(chunks, model.config.vocab_size)
    meta = {"calibration_tokens": sum(chunk.numel() for chunk in chunks)}
    merges = {}
    if recipe.kv_group_size is not None:
        merges, errors = _merges(canonical, shape, recipe, chunks, progress)
        meta.update(merge=_recipe_fields(recipe, "kv_group_size", "kv_heads_per_group", "rope", "merge_layers",
                                         "merge_method"), merge_relative_error=errors)
    merged = _NO_PLAN.with_merges(merges)
    if any(sparsity is not None for sparsity in sparsities):
        program = canonical_program(captured, merged) if merges else canonical
        statistics = _record(program, merged, shape, chunks, _ChannelStatistics(), progress)
        scores = {layer: statistics.channel_scores(layer) for layer in range(shape.num_layers)}
    plans = []
    for sparsity in sparsities:
        k_channels, plan_meta = {}, dict(meta)
        if sparsity is not None:
            k_channels = _kept_channels(scores, sparsity, recipe.align_for(shape))
            plan_meta.update(method=METHOD, sparsity=sparsity, align=recipe.align_for(shape))
        plan = Plan.from_k_channels(k_channels, model=shape, meta=plan_meta, sink=recipe.sink, recent=recipe.recent)
        plans.append(plan.with_merges(merges))
    return plans


def _learned_plan(canonical, shape: ModelShape, recipe: Recipe, texts, tokenizer, checkpoint_dir, progress) -> Plan:
    if tokenizer is None or not texts or not all(isinstance(text, str) for text in texts):
        raise RecipeError("k_method 'leank' builds retrieval prompts from texts: pass strings and tokenizer=")
    channels, factors, provenance = leank.learn_k_channels(
        canonical, shape, sparsity=recipe.k_sparsity, align=recipe.align_for(shape), sink=recipe.sink, recent=recipe.recent,
        training=recipe.leank, tokenizer=tokenizer, haystack_text="\n\n".join(texts), checkpoint_dir=checkpoint_dir,
        progress=progress)
    meta = {"method": leank.METHOD, "sparsity": recipe.k_sparsity, "align": recipe.align_for(shape), "sink": recipe.sink,
            "recent": recipe.recent, **provenance}
    return Plan.from_k_channels(channels, model=shape, meta=meta, sink=recipe.sink, recent=recipe.recent,
                                importance=factors)


def static_k_plan(
    model: torch.nn.Module,
    token_ids: Sequence[torch.Tensor] | torch.Tensor,
    *,
    sparsity: float = 0.5,
    align: int = 16,
    progress: bool = True,
) -> Plan:
    """A K-channel plan keeping, per (layer, KV head), the channels of highest `qk_channel_scores`."""
    return calibrate(model, Recipe(k_sparsity=sparsity, align=align), _as_chunks(token_ids), progress=progress)


def qk_channel_scores(
    model: torch.nn.Module, token_ids: Sequence[torch.Tensor] | torch.Tensor, *, progress: bool = True
) -> torch.Tensor:
    """(layers, Hkv, D) float64: mean|q_c| over the KV head's query group times mean|k_c|, post-RoPE.

    `token_ids` are the calibration chunks: a (N, L) tensor is N chunks of L tokens; a sequence
    holds (L,) or (B, L) tensors. Every chunk is prefilled on its own, from an empty cache.
    """
    shape = ModelShape.from_config(model.config)
    program = canonical_program(capture(model, shape), _NO_PLAN)
    statistics = _record(program, _NO_PLAN, shape, _as_chunks(token_ids), _ChannelStatistics(), progress)
    return torch.stack([statistics.channel_scores(layer) for layer in range(shape.num_layers)])


# -- statistics --------------------------------------------------------------------------------


class _ChannelStatistics:
    """Running per-layer sums of |q| and |k| per (head, channel)."""

    def __init__(self):
        self.q_abs, self.k_abs, self.q_tokens, self.k_tokens = {}, {}, {}, {}

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """q (B, Hq, S, D), k (B, Hkv, T, D): post-RoPE inputs of one attention call."""
        for sums, counts, x in ((self.q_abs, self.q_tokens, q), (self.k_abs, self.k_tokens, k)):
            sums[layer] = sums.get(layer, 0) + x.abs().sum(dim=(0, 2), dtype=torch.float64).cpu()
            counts[layer] = counts.get(layer, 0) + x.shape[0] * x.shape[2]

    def channel_scores(self, layer: int) -> torch.Tensor:
        """(Hkv, D): mean|q_c| over the KV head's query group times mean|k_c|."""
        q_mean = self.q_abs[layer] / self.q_tokens[layer]
        k_mean = self.k_abs[layer] / self.k_tokens[layer]
        num_kv_heads, head_dim = k_mean.shape
        return q_mean.view(num_kv_heads, -1, head_dim).mean(dim=1) * k_mean


class _SecondMoments:
    """Running per-layer Σ x_rowᵀ x_row of keys and values, a row being one token's heads concatenated."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for sums, x in ((self.keys, k), (self.values, v)):
            rows = x.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * x.shape[3]).double()
            sums[layer] = sums.get(layer, 0) + (rows.T @ rows).cpu()


class _AttentionRecorder(torch.fx.Interpreter):
    """Runs a program, handing each attention node's q, k and v to `statistics.add`."""

    def __init__(self, gm: torch.fx.GraphModule, statistics):
        super().__init__(gm)
        self.statistics = statistics
        self.layer_of = {site.attention: site.layer for site in find_attention_sites(gm)}

    def run_node(self, node: torch.fx.Node):
        if node in self.layer_of:
            q, k, v = (self.env[arg] for arg in node.args[:3])
            self.statistics.add(self.layer_of[node], q, k, v)
        return super().run_node(node)


def _record(program, plan: Plan, shape: ModelShape, chunks, statistics, progress: bool):
    recorder = _AttentionRecorder(program, statistics)
    param = next(program.parameters())
    with torch.no_grad():
        for chunk in tqdm(chunks, desc="calibrating", unit="chunk", disable=not progress):
            input_ids = chunk.to(param.device)
            batch, seq = input_ids.shape
            empty = empty_entries(signature_of(program).cache_inputs, plan, shape, batch, param.dtype, param.device)
            positions = torch.arange(seq, device=param.device).expand(batch, -1)
            call_program(program, input_ids, positions, empty, run=recorder.run)
    return statistics


# -- plans from statistics ---------------------------------------------------------------------


def _merges(canonical, shape: ModelShape, recipe: Recipe, chunks, progress):
    moments = _record(canonical, _NO_PLAN, shape, chunks, _SecondMoments(), progress)
    rope_of = {site.layer: site.rope for site in find_attention_sites(canonical)}
    t, s, d = recipe.kv_group_size, recipe.kv_heads_per_group, shape.head_dim
    groups = tuple(tuple(range(g * t, (g + 1) * t)) for g in range(shape.num_kv_heads // t))
    layers = recipe.merge_layers if recipe.merge_layers is not None else range(shape.num_layers)
    merges, errors = {}, {}
    for layer in layers:
        rope = rope_of[layer]
        mode = recipe.rope if rope is not None else "none"
        key_maps, value_maps = [], []
        for group in groups:
            channels = torch.tensor([h * d + c for h in group for c in range(d)])
            key_cov = moments.keys[layer][channels][:, channels]
            value_cov = moments.values[layer][channels][:, channels]
            if recipe.merge_method == "mean-pool":
                key_merge = value_merge = bases.mean_pool_merge(t, d)
            else:
                if mode == "commute":
                    key_merge = bases.commuting_merge(key_cov, t, s, d, RopeLayout(rope.layout, rope.rotary_dims))
                else:
                    key_merge = bases.svd_merge(key_cov, s, d)
                value_merge = bases.svd_merge(value_cov, s, d)
            key_maps.append((key_merge, key_cov))
            value_maps.append((value_merge, value_cov))
        merges[layer] = LayerMerge(
            groups,
            s,
            mode,
            key_down=torch.stack([m.down for m, _ in key_maps]),
            key_up=torch.stack([m.up for m, _ in key_maps]),
            value_down=torch.stack([m.down for m, _ in value_maps]),
            value_up=torch.stack([m.up for m, _ in value_maps]),
            method=recipe.merge_method,
        )
        errors[str(layer)] = {
            "key": _mean_error(key_maps),
            "value": _mean_error(value_maps),
        }
    return merges, errors


def _mean_error(maps) -> float:
    return sum(bases.relative_error(cov, merge) for merge, cov in maps) / len(maps)


def _kept_channels(scores: dict[int, torch.Tensor], sparsity: float, align: int) -> dict[int, list[list[int]]]:
    """Per layer, per head, the sorted indices of its best channels, counts from `kept_channel_counts`."""
    heads = [(layer, head) for layer, layer_scores in scores.items() for head in range(layer_scores.shape[0])]
    counts = kept_channel_counts([scores[layer][head] for layer, head in heads], sparsity, align)
    channels = {layer: [] for layer in scores}
    for (layer, head), keep in zip(heads, counts):
        channels[layer].append(sorted(scores[layer][head].topk(keep).indices.tolist()))
    return channels


# -- calibration text --------------------------------------------------------------------------


def calibration_chunks(texts, tokenizer, tokens: int, chunk_tokens: int) -> list[torch.Tensor]:
    """(1, chunk_tokens) token chunks of strings `texts`, `tokens` in all (fewer if the text runs
    out); token-id tensors are taken as the chunks they are."""
    if isinstance(texts, torch.Tensor) or (texts and isinstance(texts[0], torch.Tensor)):
        return _as_chunks(texts)
    if tokenizer is None:
        raise RecipeError("texts are strings: pass tokenizer= to turn them into tokens")
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False).input_ids]
    ids = torch.tensor(ids[:tokens], dtype=torch.long)
    chunks = [ids[i : i + chunk_tokens][None] for i in range(0, len(ids), chunk_tokens)]
    return _as_chunks([chunk for chunk in chunks if chunk.shape[1] > 1])


def _as_chunks(token_ids: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    chunks = [chunk if chunk.dim() == 2 else chunk[None] for chunk in token_ids]
    if not chunks:
        raise RecipeError("no calibration tokens given")
    return chunks


def check_weights_finite(model: torch.nn.Module) -> None:
    """Scores of NaN weights are NaN, and NaN ranks anywhere: a plan from them would look like any other."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise RecipeError(f"model parameter {name} holds NaN or infinite values: calibrating it would give a "
                              "meaningless plan")


def check_token_ids(chunks: list[torch.Tensor], vocab_size: int) -> None:
    for index, chunk in enumerate(chunks):
        if chunk.dtype.is_floating_point or chunk.dtype.is_complex or chunk.dtype == torch.bool:
            raise RecipeError(f"calibration chunk {index}: token ids must be integers, got {chunk.dtype}")
        outside = (chunk < 0) | (chunk >= vocab_size)
        if bool(outside.any()):
            position = outside.nonzero()[0].tolist()
            raise RecipeError(f"calibration chunk {index}: token id {chunk[tuple(position)].item()} at {tuple(position)} "
                              f"is outside the model's vocabulary (0..{vocab_size - 1})")


def _recipe_fields(recipe: Recipe, *names: str) -> dict:
    fields = asdict(recipe)
    return {name: list(fields[name]) if isinstance(fields[name], tuple) else fields[name] for name in names}


def random_k_plan(shape: ModelShape, sparsity: float, align: int, *, seed: int = 0) -> Plan:
    """The baseline for a static plan: as many channels as it keeps, drawn at random (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    scores = {layer: torch.rand(shape.num_kv_heads, shape.head_dim, generator=generator) for layer in range(shape.num_layers)}
    meta = {"method": "random", "sparsity": sparsity, "align": align, "seed": seed}
    return Plan.from_k_channels(_kept_channels(scores, sparsity, align), model=shape, meta=meta)
