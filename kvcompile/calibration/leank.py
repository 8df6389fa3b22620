"""LeanK: static K-channel masks learned by distillation (Zhang et al., 2025), on the compiler's own program.

The model stays frozen. One scale factor per (layer, KV head, channel) of the post-RoPE key is
learned on synthetic long-context retrieval (tasks.py over the calibration text, with a training
seed; evaluation uses other seeds and the other half of the text). A step:

1. the prompt is prefilled by the dense canonical program, without grad;
2. the prompt's ideal answer runs on that cache twice: through the dense program (the target) and
   through the scaled program, whose attention scores each *middle* key (neither among the first
   `sink` keys nor among the last `recent` keys the query sees) as `q · (s ⊙ k)`;
3. the loss is the MSE of the final hidden states, relative to the target's mean square so that
   the penalty weight does not depend on the model's hidden scale (LeanK uses the plain MSE), plus
   `l1 · mean(s)` in stage 1.

Stage 1 learns soft factors, clamped to [0, 1] after every step. Stage 2 scores with a hard mask
at the target sparsity (`hard_mask`: one global ranking, aligned counts per head, zero allowed:
streaming heads) and passes gradients straight through to the factors. The final hard mask is
the plan. Both stages checkpoint (safetensors + JSON, no pickle) so a stopped run resumes.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.fx
from tqdm import tqdm

from kvcompile.kernels.ops import masked_softmax_attention
from kvcompile.plan import ModelShape, Plan
from kvcompile.program import call_program, clone_program, empty_entries, signature_of
from kvcompile.stores import weights_fingerprint

from .recipe import LeanKTraining, RecipeError
from .training import Checkpoint, is_count, settings_fingerprint, warmup_decay, with_attention_modules

METHOD = "leank"
_DENSE = Plan.from_k_channels({})  # training runs the dense canonical program


def hard_mask(factors: torch.Tensor, sparsity: float, align: int) -> torch.Tensor:
    """The 0/1 mask (L, H, D) keeping `1 - sparsity` of all channels, ranked globally.

    Each head's channels are sorted by factor and cut into blocks of `align`; the best blocks of
    the whole model are kept, as many as the sparsity allows (rounded to whole blocks). Block
    values fall within a head, so each head keeps a prefix of its ranking: an aligned count, zero
    for a head none of whose channels rank (a streaming head).
    """
    layers, heads, head_dim = factors.shape
    ranked, order = factors.detach().sort(dim=-1, descending=True)
    blocks = ranked.unflatten(-1, (head_dim // align, align)).sum(dim=-1)  # (L, H, D / align)
    units = int(factors.numel() * (1 - sparsity) / align + 0.5)
    chosen = blocks.flatten().topk(units).indices // blocks.shape[-1]
    kept = torch.bincount(chosen, minlength=layers * heads).view(layers, heads, 1) * align
    in_ranking = torch.arange(head_dim, device=factors.device) < kept
    return torch.zeros_like(factors).scatter(-1, order, in_ranking.to(factors.dtype))


def learn_k_channels(
    canonical: torch.fx.GraphModule,
    shape: ModelShape,
    *,
    sparsity: float,
    align: int,
    sink: int,
    recent: int,
    training: LeanKTraining,
    tokenizer,
    haystack_text: str,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[int, list[list[int]]], torch.Tensor, dict]:
    """Kept channels per layer and head, the learned factors (L, H, D) and the run's provenance."""
    trainer = _Trainer(canonical, shape, sparsity, align, sink, recent, training, tokenizer, haystack_text)
    checkpoint = None if checkpoint_dir is None else Checkpoint(Path(checkpoint_dir), trainer.fingerprint())
    trainer.run(checkpoint, progress)
    mask = hard_mask(trainer.factors, sparsity, align)
    channels = {layer: [mask[layer, head].nonzero().flatten().tolist() for head in range(shape.num_kv_heads)]
                for layer in range(shape.num_layers)}
    provenance = {
        "training": {**asdict(training), "lengths": list(training.lengths), "tasks": list(training.tasks)},
        "final_loss": {"stage1": trainer.final_loss[1], "stage2": trainer.final_loss[2]},
        "streaming_heads": int((mask.sum(dim=-1) == 0).sum()),
    }
    return channels, trainer.factors.detach().cpu(), provenance


class _Trainer:
    def __init__(self, canonical, shape, sparsity, align, sink, recent, training, tokenizer, haystack_text):
        self.shape, self.sparsity, self.align, self.training = shape, sparsity, align, training
        self.sink, self.recent = sink, recent
        device = next(canonical.parameters()).device
        self.factors = torch.ones(shape.num_layers, shape.num_kv_heads, shape.head_dim, device=device, requires_grad=True)
        self.stage = 1  # what the scaled program applies: soft factors (1) or the straight-through hard mask (2)
        self.weights = weights_fingerprint(canonical)
        self.dense = _final_hidden_program(canonical)
        self.scaled = with_attention_modules(self.dense, lambda site: _ScaledKeyAttention(self, site.layer))
        self.samples = _training_samples(training, tokenizer, haystack_text)
        self.tokenizer = tokenizer
        self.losses: dict[int, list[float]] = {1: [], 2: []}  # per stage, the total loss of each step run here
        self.final_loss = {1: None, 2: None}
        self.step, self.optimizer = 0, None

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed: the model (its weights, not only its shape)
        and the recipe."""
        return settings_fingerprint({"shape": vars(self.shape), "weights": self.weights, "sparsity": self.sparsity,
                                     "align": self.align, "sink": self.sink, "recent": self.recent,
                                     "training": asdict(self.training)})

    def key_scales(self) -> torch.Tensor:
        if self.stage == 1:
            return self.factors
        # straight through: the forward sees the hard mask, the gradient reaches the factors
        return self.factors + (hard_mask(self.factors, self.sparsity, self.align) - self.factors).detach()

    def run(self, checkpoint: Checkpoint | None, progress: bool) -> None:
        stages = ((1, self.training.stage1_steps), (2, self.training.stage2_steps))
        resumed = self._restore(checkpoint) if checkpoint else None
        for stage, steps in stages:
            if resumed and stage < resumed:
                continue
            self.stage = stage
            if not (resumed == stage and self.optimizer is not None):
                self.step, self.optimizer = 0, torch.optim.AdamW([self.factors], lr=self.training.lr, weight_decay=0.0)
            resumed = None
            bar = tqdm(total=steps, initial=self.step, desc=f"leank stage {stage}", unit="step", disable=not progress)
            while self.step < steps:
                loss, distill = self._train_step(steps)
                self.final_loss[stage] = round(distill, 6)
                self.losses[stage].append(loss)
                self.step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{self._sparsity():.2f}")
                if checkpoint and (self.step % self.training.checkpoint_every == 0 or self.step == steps):
                    checkpoint.save({"factors": self.factors}, self.optimizer, {
                        "stage": self.stage, "step": self.step,
                        "final_loss": {str(k): v for k, v in self.final_loss.items()}})
            bar.close()

    def _restore(self, checkpoint: Checkpoint) -> int | None:
        """Load a saved state into this trainer; the stage it resumes, or None when there is none."""
        self.optimizer = torch.optim.AdamW([self.factors], lr=self.training.lr, weight_decay=0.0)
        fields = checkpoint.restore({"factors": self.factors}, self.optimizer)
        if fields is None:
            self.optimizer = None
            return None
        steps = {1: self.training.stage1_steps, 2: self.training.stage2_steps}
        stage, step, final_loss = fields.get("stage"), fields.get("step"), fields.get("final_loss")
        if stage not in steps or not is_count(step, steps[stage]) or not isinstance(final_loss, dict):
            raise RecipeError(f"{checkpoint.state_path}: not a state this run wrote (stage {stage!r}, step {step!r} of "
                              f"{steps.get(stage, '?')}); use a fresh directory")
        self.final_loss = {int(k): v for k, v in final_loss.items()}
        self.stage, self.step = stage, step
        return stage

    def _train_step(self, steps: int) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.training.lr * warmup_decay(self.step, steps, self.training.warmup)
        sample = self.samples[self.step % len(self.samples)]
        answer = sample.answer_ids(self.tokenizer)
        device = self.factors.device
        prompt, answer = sample.prompt_ids.to(device), answer.to(device)
        with torch.no_grad():
            cache = _prefill(self.dense, self.shape, prompt)
            target = _run(self.dense, answer, prompt.shape[1], cache)
        hidden = _run(self.scaled, answer, prompt.shape[1], cache)
        distill = (hidden - target).float().pow(2).mean() / target.float().pow(2).mean()
        loss = distill + (self.training.l1 * self.factors.abs().mean() if self.stage == 1 else 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[self.factors])
        self.optimizer.step()
        with torch.no_grad():
            self.factors.clamp_(0, 1)
        return loss.detach().item(), distill.detach().item()

    def _sparsity(self) -> float:
        """Share of factors that prune: below 0.5 in stage 1, outside the hard mask in stage 2."""
        if self.stage == 1:
            return float((self.factors < 0.5).float().mean())
        return float(1 - hard_mask(self.factors, self.sparsity, self.align).mean())


def _training_samples(training: LeanKTraining, tokenizer, haystack_text: str) -> list:
    """Enough prompts for the longer stage, cycling over tasks and lengths; depths spread per cell."""
    from kvcompile.evaluation import tasks  # the task generator loads only when LeanK trains

    cells = [(task, length) for length in training.lengths for task in training.tasks]
    per_cell = max(1, math.ceil(max(training.stage1_steps, training.stage2_steps) / len(cells)))
    by_cell = [tasks.make_samples(task, tokenizer, length, per_cell, training.seed, haystack_text=haystack_text)
               for task, length in cells]
    return [cell[i] for i in range(per_cell) for cell in by_cell]


# -- the programs ---------------------------------------------------------------------------------


def _final_hidden_program(canonical: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The canonical program returning the final hidden states (the LM head's input) for logits."""
    gm = clone_program(canonical)
    output = next(node for node in gm.graph.nodes if node.op == "output")
    logits = output.args[0][0]
    if logits.target != torch.ops.aten.linear.default:
        raise RecipeError(f"leank: the logits are not an LM-head linear ({logits.format_node()}); cannot distill hidden states")
    output.args = ((logits.args[0], *output.args[0][1:]),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class _ScaledKeyAttention(torch.nn.Module):
    """`kvcompile::attention` whose middle keys meet the query through the trainer's key scales."""

    def __init__(self, trainer: _Trainer, layer: int):
        super().__init__()
        self.trainer, self.layer = trainer, layer

    def forward(self, q, k, v, mask, scale: float, is_causal: bool):
        repeats = q.shape[1] // k.shape[1]
        scales = self.trainer.key_scales()[self.layer].repeat_interleave(repeats, dim=0)  # (Hq, D)
        keys = k.repeat_interleave(repeats, dim=1).transpose(-1, -2)
        full, scaled = q @ keys, (q * scales[:, None, :]) @ keys
        middle = _middle_keys(q.shape[2], k.shape[2], self.trainer.sink, self.trainer.recent, q.device)
        return masked_softmax_attention(torch.where(middle, scaled, full) * scale, v, mask, is_causal)


def _middle_keys(queries: int, keys: int, sink: int, recent: int, device) -> torch.Tensor:
    """(S, T): key j is in query i's middle: past the sink, not among the `recent` last it sees."""
    seen = torch.arange(keys - queries, keys, device=device)[:, None] + 1  # keys query i sees
    j = torch.arange(keys, device=device)[None, :]
    return (j >= sink) & (j < seen - recent)


def _prefill(program: torch.fx.GraphModule, shape: ModelShape, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cache entries (by name) after a dense prefill of `prompt`."""
    dtype = next(program.parameters()).dtype
    empty = empty_entries(signature_of(program).cache_inputs, _DENSE, shape, prompt.shape[0], dtype, prompt.device)
    return _call(program, prompt, 0, empty)[1]


def _run(program, ids: torch.Tensor, past_length: int, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states of `ids` following `past_length` cached tokens."""
    return _call(program, ids, past_length, cache)[0]


def _call(program, ids, past_length: int, cache: dict[str, torch.Tensor]):
    positions = torch.arange(past_length, past_length + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return call_program(program, ids, positions, cache)
