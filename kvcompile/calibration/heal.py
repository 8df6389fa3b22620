"""Healing: what a plan changes, trained by distillation from the dense model.

`heal(model, plan, texts)` returns the plan with trained tensors, so that the compressed model's
next-token distributions move toward the dense model's (KL(dense || plan's model), the fine-tuning
that Yu et al. 2024, Palu, TransMLA and MHA2MLA run after their SVD start):

- the key and value `down`/`up` maps of every merged layer (plan.py's LayerMerge): the merge pass
  folds them into the merged K/V projections (and biases), the query rows and the output columns
  (rope "commute"/"none"), or runs them as the post-RoPE group projections (rope "post");
- with `rank` > 0, low-rank updates of the query, key, value and output projections (or those
  `projections` names) of every layer the plan merges or prunes (plan.py's LayerUpdate, b @ a with
  b starting at 0): what lets merged heads read other directions of the hidden state than the heads
  they replace, and lets queries and keys of a pruned layer put what matters into the channels it
  keeps (on SmolLM2 the query and key updates of a 70% K-channel plan also cost retrieval: README).

The user's model stays frozen and untouched; K-channel masks and windows stay as they are. A
commute merge stays one that commutes with RoPE: its key maps are trained as
`bases.commuting_part` of free parameters, and updates act before the merge folds the weights, so
the healed plan still folds into an ordinary GQA checkpoint (`TransformedModel.save_pretrained`).

The student is the dense canonical program whose attention sites compute what the plan's programs
compute, in plain differentiable torch (`_PlannedAttention`): keys and values merged per group,
queries projected, outputs mapped back, and, in a plan that prunes K channels, the decode rules.
Each calibration chunk runs as the transformed model runs a prompt and its continuation: its first
half is the prompt (dense attention over the merged heads: the prefill), its second half decoded
(middle keys scored with the kept channels, streaming heads blind to them, plan.py). Without K
channels the whole chunk is the prompt. With windows, what a decoded token sees as middle depends on
how it was decoded: `decode="call"` runs the second half as one decode call (every query sees the
prompt's middle, and the call's own earlier tokens with all channels), `decode="steps"` as one-token
steps, as `generate` runs them (each query sees the middle its step holds: the window moves along, so
every decoded position scores most of its past on the kept channels, as in generation at any length).
tests/test_heal.py checks the healed plan's `transform` logits against this student, both ways.

With `tasks`, a share of the chunks are retrieval prompts (evaluation/tasks.py's, their haystack
cut from the calibration text) ending in their ideal answers, and such a chunk is scored on its
answer alone: KL over prose is mostly about the next word, and a plan can keep that while losing
the long-range lookups a retrieval answer needs (LeanK trains its masks on the same prompts).

Deterministic from `seed` (the order of the chunks and the updates' `a` factors; the maps start
from the plan's) on one device, and resumable: with `checkpoint_dir`, the trained tensors and
AdamW's moments are saved every `checkpoint_every` steps (training.py) and a run with the same
model, plan and settings resumes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.fx
import torch.utils.checkpoint
from tqdm import tqdm

from kvcompile.capture import program_for
from kvcompile.kernels.ops import masked_softmax_attention, merge_heads_reference
from kvcompile.passes import find_attention_sites
from kvcompile.passes.projections import ProjectionWeight, fetch, projection_weights
from kvcompile.passes.sites import AttentionSite
from kvcompile.pipeline import canonical_program
from kvcompile.plan import PROJECTIONS, LayerMerge, LayerUpdate, ModelShape, Plan
from kvcompile.program import call_program, clone_program, empty_entries, signature_of
from kvcompile.rope import RopeLayout
from kvcompile.runtime import checked_model_shape
from kvcompile.stores import weights_fingerprint

from .bases import commuting_part
from .calibrate import calibration_chunks, check_token_ids, check_weights_finite
from .recipe import RecipeError
from .training import Checkpoint, is_count, settings_fingerprint, warmup_decay, with_attention_modules

_MAPS = ("key_down", "key_up", "value_down", "value_up")
DECODE_MODES = ("call", "steps")  # how a chunk's decoded half runs (the module docstring)
_DENSE = Plan.from_k_channels({})  # the teacher, and the student's program before its attention is replaced


@dataclass(frozen=True)
class _Settings:
    """What a healing run depends on besides the model and the plan (recorded in the plan's meta)."""

    steps: int
    lr: float
    seed: int
    warmup: float
    chunk_tokens: int
    calib_tokens: int
    rank: int
    batch_size: int
    tasks: tuple[str, ...] = ()
    task_share: float = 0.0
    projections: tuple[str, ...] = PROJECTIONS
    decode: str = "call"


@dataclass(frozen=True)
class _Chunk:
    """Token ids (1, n) the student and the teacher read, and how many of its last positions the
    loss scores (None: every position; a retrieval prompt: the positions predicting its answer)."""

    ids: torch.Tensor
    scored_tail: int | None = None

    def cut(self, length: int) -> torch.Tensor:
        """`length` tokens of it: the first ones, or for a chunk scored at its tail the last ones."""
        return self.ids[:, :length] if self.scored_tail is None else self.ids[:, -length:]


def heal(
    model: torch.nn.Module,
    plan: Plan,
    texts: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor,
    *,
    tokenizer=None,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    warmup: float = 0.1,
    chunk_tokens: int | None = None,
    calib_tokens: int = 65536,
    rank: int = 16,
    batch_size: int = 1,
    tasks: Sequence[str] = (),
    task_share: float = 0.25,
    projections: Sequence[str] = PROJECTIONS,
    decode: str = "call",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    program: torch.fx.GraphModule | None = None,
) -> Plan:
    """`plan` with its merge maps and, with `rank` > 0, rank-`rank` updates of the attention
    projections of the layers it touches, trained for `steps` AdamW steps (learning rate `lr`, linear
    warm-up over `warmup` of the steps, then linear decay) to bring the transformed model's
    next-token distributions close to `model`'s on `texts` (strings with `tokenizer`, cut into
    chunks of `chunk_tokens`, `calib_tokens` in all; or token-id tensors, each a chunk), `batch_size`
    chunks a step (cut to the shortest of them). `chunk_tokens` None: 512, or for a windowed plan that
    prunes K channels enough that each chunk's decode half reads a pruned middle
    (`default_chunk_tokens`). `tasks` (names of evaluation/tasks.py's TASKS, with string texts):
    `task_share` of the chunks a step draws are retrieval prompts of `chunk_tokens` tokens ending in
    their answers, scored at the answer (see the module docstring). `projections`: which of the
    attention's projections (of PROJECTIONS) get updates; those a healed plan already updates train on.
    `decode` (of DECODE_MODES): how a chunk's second half is decoded, for a windowed plan that prunes
    K channels: "call" (one decode call) or "steps" (one-token steps, as generation runs; the module
    docstring).

    `model` is not modified. The result's meta records the healing (`meta["heal"]`: settings,
    calibration tokens, first and last step's KL). `checkpoint_dir`: save the run there every
    `checkpoint_every` steps, and resume from what it holds. `program`, from
    `kvcompile.capture(model)`, saves tracing the model again.
    """
    chunk_tokens = default_chunk_tokens(plan) if chunk_tokens is None else chunk_tokens
    settings = _Settings(steps, lr, seed, warmup, chunk_tokens, calib_tokens, rank, batch_size,
                         tuple(tasks), task_share if tasks else 0.0, tuple(projections), decode)
    _check_settings(settings, checkpoint_every)
    shape = checked_model_shape(model, plan)
    if not plan.merges and not rank:
        raise RecipeError("nothing to heal: this plan merges no KV heads (whose maps healing trains) and rank=0 asks "
                          "for no projection updates; pass rank >= 1 to heal a plan that prunes K channels")
    if isinstance(texts, (str, bytes)) or len(texts) == 0:
        raise RecipeError("texts is empty: healing distills on calibration text; pass a list of strings (with "
                          "tokenizer=) or of token-id tensors")
    check_weights_finite(model)
    chunks = calibration_chunks(texts, tokenizer, calib_tokens, chunk_tokens)
    if isinstance(texts[0], str):  # the text's short last chunk would cut every batch it joins
        chunks = [chunk for chunk in chunks if chunk.shape[1] == chunk_tokens] or chunks
    chunks = [_Chunk(chunk) for chunk in chunks]
    if settings.tasks:
        if not isinstance(texts[0], str) or tokenizer is None:
            raise RecipeError("heal: tasks build retrieval prompts from string texts with tokenizer=; token-id chunks "
                              "cannot say where an answer is")
        chunks += task_chunks(settings, tokenizer, "\n\n".join(texts))
    check_token_ids([chunk.ids for chunk in chunks], model.config.vocab_size)
    _check_chunks_reach_the_middle(plan, [chunk.ids for chunk in chunks])
    captured = program_for(model, program, shape)
    canonical_program(captured, plan)  # the plan's own merge pass: a merge it cannot fold fails here, by layer
    trainer = _Trainer(canonical_program(captured, _DENSE), plan, shape, chunks, settings)
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = settings_fingerprint({"weights": weights_fingerprint(model), "plan": plan.fingerprint(),
                                            "settings": asdict(settings)})
        checkpoint = Checkpoint(Path(checkpoint_dir), fingerprint)
    trainer.run(checkpoint, checkpoint_every, progress)
    # lists where the settings hold tuples, as the saved plan's JSON reads back
    record = {**asdict(settings), "tasks": list(settings.tasks), "projections": list(settings.projections),
              "calibration_tokens": sum(chunk.ids.numel() for chunk in chunks),
              "initial_loss": trainer.initial_loss, "final_loss": trainer.final_loss, "healed_from": plan.fingerprint()}
    healed = plan.with_merges(trainer.student.healed_merges()).with_updates(trainer.student.healed_updates())
    return replace(healed, meta={**plan.meta, "heal": record})


def default_chunk_tokens(plan: Plan) -> int:
    """512 tokens, or for a windowed plan that prunes K channels a chunk whose first half leaves its
    window and a middle of at least one buffer (the second half is the decode call the middle acts in)."""
    if not (plan.k_channels and plan.windowed):
        return 512
    return max(512, 4 * (plan.sink + plan.recent + plan.buffer))


def _check_chunks_reach_the_middle(plan: Plan, chunks: list[torch.Tensor]) -> None:
    if not (plan.k_channels and plan.windowed):
        return
    shortest = min(chunk.shape[1] for chunk in chunks)
    if plan.middle_length(prompt_length(plan, shortest)) == 0:
        raise RecipeError(
            f"heal: a chunk of {shortest} tokens prefills {prompt_length(plan, shortest)}, which the plan's windows "
            f"(sink {plan.sink}, recent {plan.recent}, buffer {plan.buffer}) hold whole: no middle, no pruned channel "
            f"would be trained; use chunk_tokens >= {default_chunk_tokens(plan)} (the default)")


def _check_settings(settings: _Settings, checkpoint_every: int) -> None:
    for name in ("steps", "chunk_tokens", "calib_tokens", "batch_size"):
        value = getattr(settings, name)
        if not is_count(value) or value < 1:
            raise RecipeError(f"heal: {name} must be a positive int, got {value!r}")
    if settings.chunk_tokens < 2:
        raise RecipeError(f"heal: chunk_tokens must be >= 2 (a token and the one it predicts), got {settings.chunk_tokens}")
    if not is_count(checkpoint_every) or checkpoint_every < 1:
        raise RecipeError(f"heal: checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr) and settings.lr > 0):
        raise RecipeError(f"heal: lr must be a positive number, got {settings.lr!r}")
    if not (isinstance(settings.warmup, (int, float)) and 0 <= settings.warmup <= 1):
        raise RecipeError(f"heal: warmup must be a share of the steps in [0, 1], got {settings.warmup!r}")
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, int):
        raise RecipeError(f"heal: seed must be an int, got {settings.seed!r}")
    if not is_count(settings.rank):
        raise RecipeError(f"heal: rank must be a non-negative int, got {settings.rank!r}")
    unknown = [name for name in settings.projections if name not in PROJECTIONS]
    if unknown or not settings.projections or len(set(settings.projections)) < len(settings.projections):
        raise RecipeError(f"heal: projections must name some of {list(PROJECTIONS)} once each, got "
                          f"{list(settings.projections)!r}")
    from kvcompile.evaluation.tasks import TASKS

    unknown = [task for task in settings.tasks if task not in TASKS]
    if unknown:
        raise RecipeError(f"heal: unknown tasks {unknown}; expected some of {list(TASKS)}")
    if settings.tasks and not (isinstance(settings.task_share, (int, float)) and 0 < settings.task_share < 1):
        raise RecipeError(f"heal: task_share must be a share of the chunks in (0, 1), got {settings.task_share!r}")
    if settings.decode not in DECODE_MODES:
        raise RecipeError(f"heal: decode must be one of {list(DECODE_MODES)}, got {settings.decode!r}")


def task_chunks(settings: _Settings, tokenizer, haystack_text: str) -> list[_Chunk]:
    """A retrieval prompt for each chunk a step will draw from them (so none repeats), cycling over
    the tasks: prompt and ideal answer, the last `chunk_tokens` tokens of them, scored on the answer
    (the position before each answer token, and the one after the last)."""
    from kvcompile.evaluation import tasks

    draws = _task_draws(settings).count(True)
    if not draws:  # a run too short for its share to reach one chunk
        return []
    per_task = math.ceil(draws / len(settings.tasks))
    try:
        samples = [tasks.make_samples(task, tokenizer, settings.chunk_tokens, per_task, settings.seed,
                                      haystack_text=haystack_text) for task in settings.tasks]
    except ValueError as error:
        raise RecipeError(f"heal: tasks need longer chunks than chunk_tokens={settings.chunk_tokens} ({error})") from None
    chunks = []
    for sample in (by_task[i] for i in range(per_task) for by_task in samples):
        answer = sample.answer_ids(tokenizer)
        ids = torch.cat([sample.prompt_ids, answer], dim=1)[:, -settings.chunk_tokens:]
        chunks.append(_Chunk(ids, scored_tail=answer.shape[1] + 1))
    return chunks[:draws]


def _task_draws(settings: _Settings) -> list[bool]:
    """For each chunk the run draws, whether it is a retrieval prompt: `task_share` of the draws
    (0 without tasks), spread evenly."""
    share = settings.task_share
    return [math.floor((draw + 1) * share) > math.floor(draw * share)
            for draw in range(settings.steps * settings.batch_size)]


# -- the student ----------------------------------------------------------------------------------


class _MergeMaps(torch.nn.Module):
    """One merged layer's trainable maps, started from the plan's. In rope "commute" mode the key
    maps used are `commuting_part` of the parameters, so every step keeps them commuting with RoPE."""

    def __init__(self, merge: LayerMerge, layout: RopeLayout | None, head_dim: int):
        super().__init__()
        self.merge, self.layout, self.head_dim = merge, layout, head_dim
        for name in _MAPS:
            self.register_parameter(name, torch.nn.Parameter(getattr(merge, name).detach().float().clone()))

    def maps(self) -> dict[str, torch.Tensor]:
        maps = {name: getattr(self, name) for name in _MAPS}
        if self.layout is not None:
            for name in ("key_down", "key_up"):
                maps[name] = torch.stack([commuting_part(group, self.head_dim, self.layout) for group in maps[name]])
        return maps

    def healed(self) -> LayerMerge:
        with torch.no_grad():
            maps = {name: tensor.cpu().contiguous() for name, tensor in self.maps().items()}
        return replace(self.merge, **maps)


class _ProjectionUpdates(torch.nn.Module):
    """One layer's trainable low-rank updates, starting where the plan's are (a healed plan heals
    on), else for each projection b (out, r) from zeros and a (r, in) drawn from `generator`: the
    student starts as the plan's model."""

    def __init__(self, sizes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator,
                 start: LayerUpdate | None):
        super().__init__()
        self.names = list(sizes)
        for name, (out, inp) in sizes.items():
            if start is not None and name in start.factors:
                b, a = (tensor.detach().float().clone() for tensor in start.factors[name])
            else:
                b, a = torch.zeros(out, rank), torch.randn(rank, inp, generator=generator) / inp**0.5
            self.register_parameter(f"{name}_b", torch.nn.Parameter(b))
            self.register_parameter(f"{name}_a", torch.nn.Parameter(a))

    def delta(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_b") @ getattr(self, f"{name}_a")

    def healed(self) -> LayerUpdate:
        return LayerUpdate({name: tuple(getattr(self, f"{name}_{side}").detach().cpu().contiguous() for side in "ba")
                            for name in self.names})


class _UpdatedWeight(torch.nn.Module):
    """A linear layer's weight as the plan's update pass makes it: W + b @ a on each projection's rows
    (columns), differentiable in the factors."""

    def __init__(self, weight: ProjectionWeight, updates: _ProjectionUpdates):
        super().__init__()
        self.weight, self.updates = weight, updates

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        names = [name for name in self.weight.parts if name in self.updates.names]
        return self.weight.with_deltas(tensor, {name: self.updates.delta(name) for name in names})


class _Student:
    """The dense canonical program computing the plan's attention and projections: differentiable
    in the merge maps and the projection updates."""

    def __init__(self, dense: torch.fx.GraphModule, plan: Plan, shape: ModelShape, rank: int, seed: int,
                 projections: Sequence[str] = PROJECTIONS, decode: str = "call"):
        self.plan, self.shape, self.decode = plan, shape, decode
        self.device = next(dense.parameters()).device
        self.merge_maps: dict[int, _MergeMaps] = {}
        self.updates: dict[int, _ProjectionUpdates] = {}
        self.prompt_length = 0  # tokens of the current chunk the prefill runs; the rest is decoded
        updated = rank or plan.updates
        program = (self._with_updated_weights(dense, rank, projections, torch.Generator().manual_seed(seed))
                   if updated else dense)
        self.program = with_attention_modules(program, self._attention_for)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        maps = {f"merges.{layer}.{name}": getattr(maps, name) for layer, maps in self.merge_maps.items() for name in _MAPS}
        updates = {f"updates.{layer}.{name}": tensor for layer, module in self.updates.items()
                   for name, tensor in module.named_parameters()}
        return {**maps, **updates}

    def healed_merges(self) -> dict[int, LayerMerge]:
        return {layer: maps.healed() for layer, maps in self.merge_maps.items()}

    def healed_updates(self) -> dict[int, LayerUpdate]:
        return {layer: module.healed() for layer, module in self.updates.items()}

    def logits(self, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
        self.prompt_length = prompt_length
        return _logits(self.program, self.shape, ids)

    def _with_updated_weights(self, dense: torch.fx.GraphModule, rank: int, projections: Sequence[str],
                              generator: torch.Generator):
        """A copy of `dense` whose `projections` in the layers the plan touches (with `rank` > 0), and
        those the plan updates, read `_UpdatedWeight`s."""
        gm = clone_program(dense)
        touched = {*self.plan.merges, *self.plan.k_channels} if rank else set()
        touched |= set(self.plan.updates)
        for site in find_attention_sites(gm):
            if site.layer not in touched:
                continue
            weights = projection_weights(gm, site)
            sizes = {name: shape for weight in weights
                     for name, shape in weight.part_shapes(fetch(gm, weight.linear.args[1].target)).items()}
            start = self.plan.updates.get(site.layer)
            wanted = {*(projections if rank else ()), *(start.factors if start is not None else ())}
            names = [name for name in PROJECTIONS if name in wanted]
            updates = self.updates[site.layer] = _ProjectionUpdates(
                {name: sizes[name] for name in names}, rank, generator, start).to(self.device)
            for weight in weights:
                name = f"updated_weight_{site.layer}_{weight.linear.name}"
                gm.add_submodule(name, _UpdatedWeight(weight, updates))
                with gm.graph.inserting_before(weight.linear):
                    weight.linear.update_arg(1, gm.graph.call_module(name, (weight.linear.args[1],)))
        gm.recompile()
        return gm

    def _attention_for(self, site: AttentionSite) -> torch.nn.Module | None:
        merge = self.plan.merges.get(site.layer)
        if merge is None and site.layer not in self.plan.k_channels:
            return None
        maps = None
        if merge is not None:
            commutes = merge.rope == "commute" and site.rope is not None
            layout = RopeLayout(site.rope.layout, site.rope.rotary_dims) if commutes else None
            maps = self.merge_maps[site.layer] = _MergeMaps(merge, layout, self.shape.head_dim).to(self.device)
        return _PlannedAttention(self, site.layer, maps)


class _PlannedAttention(torch.nn.Module):
    """`kvcompile::attention` of one layer as the plan's programs compute it, from the dense model's
    post-RoPE q (B, Hq, S, d) and k, v (B, Hkv, T, d); output (B, Hq, S, d) in the model's head order.

    Merged (bases.py): the group's keys and values become c = k_group @ down (s·d channels), query
    head j of KV head h (the p-th of its group) scores q_j @ up_k,pᵀ against them, and its output
    returns to d channels through up_v,p: the merge pass's folds, unfolded (they commute with RoPE).
    Pruned: see the module docstring."""

    def __init__(self, student: _Student, layer: int, maps: _MergeMaps | None):
        super().__init__()
        self.student, self.layer, self.maps = student, layer, maps
        shape = student.shape
        kv_heads = [j // (shape.num_heads // shape.num_kv_heads) for j in range(shape.num_heads)]  # per query head
        if maps is None:
            self.owner, self.pieces = kv_heads, None
        else:  # the merged head a query head scores against, and the columns of `up` that are its own
            place = {h: (g, p) for g, group in enumerate(maps.merge.groups) for p, h in enumerate(group)}
            self.owner = [place[h][0] for h in kv_heads]
            self.pieces = [slice(place[h][1] * shape.head_dim, (place[h][1] + 1) * shape.head_dim) for h in kv_heads]
        self.kept = None  # the kept K channels of each (merged) KV head, where the plan prunes this layer
        if layer in student.plan.k_channels:
            channels = student.plan.k_channels[layer]
            width = shape.head_dim if maps is None else maps.merge.merged_head_dim(shape.head_dim)
            self.kept = torch.zeros(len(channels), width, dtype=torch.bool)
            for head, ids in enumerate(channels):
                self.kept[head, list(ids)] = True

    def forward(self, q, k, v, mask, scale: float, is_causal: bool):
        owner = torch.tensor(self.owner, device=q.device)
        if self.maps is not None:
            maps = self.maps.maps()
            heads = list(zip(self.owner, self.pieces))
            query_maps = torch.stack([maps["key_up"][g][:, piece].T for g, piece in heads])  # (Hq, d, s·d)
            output_maps = torch.stack([maps["value_up"][g][:, piece] for g, piece in heads])  # (Hq, s·d, d)
            groups = torch.tensor(self.maps.merge.groups, device=k.device)
            k = merge_heads_reference(k, groups, maps["key_down"].to(k.dtype))
            v = merge_heads_reference(v, groups, maps["value_down"].to(v.dtype))
            q = torch.einsum("bhsd,hde->bhse", q, query_maps.to(q.dtype))
        keys, values = k.index_select(1, owner), v.index_select(1, owner)  # one KV head per query head
        # the (S, T) scores are recomputed in the backward pass rather than kept for it: a layer then
        # holds its q, k, v, and chunks as long as the contexts evaluated fit
        out = torch.utils.checkpoint.checkpoint(self._attend, q, keys, values, owner, mask, scale, is_causal,
                                                use_reentrant=False)
        if self.maps is not None:
            out = torch.einsum("bhse,hed->bhsd", out, output_maps.to(out.dtype))
        return out

    def _attend(self, q, keys, values, owner, mask, scale: float, is_causal: bool):
        scores = q @ keys.transpose(-1, -2)
        if self.kept is not None:
            scores = self._decode_scores(scores, q, keys, owner)
        return masked_softmax_attention(scores * scale, values, mask, is_causal)

    def _decode_scores(self, scores, q, keys, owner):
        """Scores of the decoded queries (the chunk past the prompt): middle keys (all keys without
        windows) scored on the kept channels; in a windowed plan a streaming head does not see them.
        A query's middle is what the cache holds as middle when it is decoded: the prompt's for one
        decode call, the tokens before it for one-token steps (plan.middle_length)."""
        plan, prompt_length = self.student.plan, self.student.prompt_length
        queries, length = scores.shape[-2:]
        kept = self.kept.to(q.device)[owner]  # (Hq, width)
        pruned = (q * kept[:, None, :].to(q.dtype)) @ keys.transpose(-1, -2)
        first = length - queries  # the first query's place in the chunk
        columns = torch.arange(length, device=q.device)
        if plan.windowed:
            steps = self.student.decode == "steps"  # a step at place p holds p tokens; a call, the prompt's
            ends = torch.tensor([plan.sink + plan.middle_length(place if steps else prompt_length)
                                 for place in range(first, length)], device=q.device)
            middle = (columns >= plan.sink) & (columns < ends[:, None])
        else:
            middle = torch.ones(1, length, dtype=torch.bool, device=q.device)
        decode = torch.arange(first, length, device=q.device) >= prompt_length
        in_middle = decode[:, None] & middle  # (S, T)
        scores = torch.where(in_middle, pruned, scores)
        if plan.windowed:
            streaming = ~kept.any(dim=-1)
            scores = scores.masked_fill(streaming[:, None, None] & in_middle, float("-inf"))
        return scores


def _logits(program: torch.fx.GraphModule, shape: ModelShape, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a chunk `ids` (1, L) prefilled from an empty cache."""
    param = next(program.parameters())
    empty = empty_entries(signature_of(program).cache_inputs, _DENSE, shape, ids.shape[0], param.dtype, ids.device)
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return call_program(program, ids, positions, empty)[0]


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      scored: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions (nats): averaged over positions, or
    with `scored` (B, S) bool, over each row's scored positions and then over rows."""
    teacher = teacher_logits.float().log_softmax(dim=-1)
    student = student_logits.float().log_softmax(dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    if scored is None:
        return kl.mean()
    return ((kl * scored).sum(dim=-1) / scored.sum(dim=-1)).mean()


def prompt_length(plan: Plan, chunk_length: int) -> int:
    """Tokens of a chunk the student prefills: half of it when the plan prunes K channels (the other
    half is the decode call, where pruning acts), all of it otherwise."""
    return chunk_length // 2 if plan.k_channels else chunk_length


# -- training -------------------------------------------------------------------------------------


class _Trainer:
    def __init__(self, dense: torch.fx.GraphModule, plan: Plan, shape: ModelShape, chunks: list[_Chunk],
                 settings: _Settings):
        self.dense, self.plan, self.shape, self.settings = dense, plan, shape, settings
        self.student = _Student(dense, plan, shape, settings.rank, settings.seed, settings.projections, settings.decode)
        self.trained = self.student.parameters()
        self.device = self.student.device
        self.chunks = chunks
        self.order = _chunk_order(chunks, settings)
        self.optimizer = torch.optim.AdamW(list(self.trained.values()), lr=settings.lr, weight_decay=0.0)
        self.step, self.initial_loss, self.final_loss = 0, None, None

    def run(self, checkpoint: Checkpoint | None, checkpoint_every: int, progress: bool) -> None:
        if checkpoint is not None:
            self._restore(checkpoint)
        steps = self.settings.steps
        bar = tqdm(total=steps, initial=self.step, desc="healing", unit="step", disable=not progress)
        while self.step < steps:
            loss = self._train_step()
            self.initial_loss = loss if self.initial_loss is None else self.initial_loss
            self.final_loss = loss
            self.step += 1
            bar.update()
            bar.set_postfix(kl=f"{loss:.4f}")
            if checkpoint is not None and (self.step % checkpoint_every == 0 or self.step == steps):
                checkpoint.save(self.trained, self.optimizer, {
                    "step": self.step, "initial_loss": self.initial_loss, "final_loss": self.final_loss})
        bar.close()

    def _train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr * warmup_decay(self.step, self.settings.steps, self.settings.warmup)
        size = self.settings.batch_size
        batch = [self.chunks[i] for i in self.order[self.step * size : (self.step + 1) * size]]
        length = min(chunk.ids.shape[1] for chunk in batch)
        ids = torch.cat([chunk.cut(length) for chunk in batch]).to(self.device)
        scored = None
        if any(chunk.scored_tail is not None for chunk in batch):
            positions = torch.arange(length, device=self.device)
            scored = torch.stack([positions >= length - (chunk.scored_tail or length) for chunk in batch])
        with torch.no_grad():
            teacher = _logits(self.dense, self.shape, ids)
        student = self.student.logits(ids, prompt_length(self.plan, ids.shape[1]))
        loss = distillation_loss(teacher, student, scored)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.trained.values()))  # the model's own weights get no gradient
        self.optimizer.step()
        return round(loss.detach().item(), 6)

    def _restore(self, checkpoint: Checkpoint) -> None:
        fields = checkpoint.restore(self.trained, self.optimizer)
        if fields is None:
            return
        step = fields.get("step")
        losses = [fields.get("initial_loss"), fields.get("final_loss")]
        if not is_count(step, self.settings.steps) or not all(isinstance(x, (int, float)) for x in losses):
            raise RecipeError(f"{checkpoint.state_path}: not a state this run wrote (step {step!r} of "
                              f"{self.settings.steps}); use a fresh directory")
        self.step, (self.initial_loss, self.final_loss) = step, losses


def _chunk_order(chunks: list[_Chunk], settings: _Settings) -> list[int]:
    """The chunks the steps train on, in order: retrieval prompts at the draws `_task_draws` picks,
    text chunks at the others, each kind a fresh permutation of its chunks per pass over them, drawn
    from the seed, so a resumed run sees what the uninterrupted one does."""
    generator = torch.Generator().manual_seed(settings.seed)
    is_task = _task_draws(settings)
    drawn = {}
    for kind in (False, True):  # text first: a run without tasks draws what it always drew
        indices = [i for i, chunk in enumerate(chunks) if (chunk.scored_tail is not None) == kind]
        drawn[kind] = iter(_permutations(indices, is_task.count(kind), generator))
    return [next(drawn[kind]) for kind in is_task]


def _permutations(indices: list[int], count: int, generator: torch.Generator) -> list[int]:
    """`count` of `indices`: a fresh permutation of all of them per pass."""
    if not count:
        return []
    passes = math.ceil(count / len(indices))
    order = torch.cat([torch.randperm(len(indices), generator=generator) for _ in range(passes)])[:count]
    return [indices[j] for j in order.tolist()]
