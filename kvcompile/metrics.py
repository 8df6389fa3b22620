"""Quality and size metrics that compare a dense model with a transformed one on the same inputs.

A "model" here is anything called like a Hugging Face causal LM: `model(ids, past_key_values=cache,
use_cache=True)` returning `.logits` and `.past_key_values`; both a plain transformers model and a
`TransformedModel` are. Scored tokens are fed one decode step at a time, so what is measured for a
transformed model is attention over its compressed cache, not its dense prefill.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .cache import CompressedKVCache
from .plan import ModelShape, Plan


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, score_last: int, *, progress: bool = True) -> float:
    """exp(mean NLL) of the last `score_last` tokens of each window (N, L), given the tokens before.

    The first L - score_last tokens of a window are prefilled; the scored tokens are then
    teacher-forced one decode step at a time.
    """
    context = windows.shape[1]
    if not 0 < score_last < context:
        raise ValueError(f"score_last must be in [1, {context - 1}] for windows of {context} tokens, got {score_last}")
    total_nll = 0.0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        prefix, scored = window[None, :-score_last], window[None, -score_last:]
        log_probs = _teacher_forced_logits(model, prefix, scored).float().log_softmax(dim=-1)
        total_nll -= log_probs.gather(-1, scored[..., None]).sum().item()
    return math.exp(total_nll / (windows.shape[0] * score_last))


@torch.no_grad()
def greedy_agreement(dense, candidate, prompts: torch.Tensor, new_tokens: int, *, progress: bool = True) -> float:
    """Fraction of the dense model's greedy continuation tokens that `candidate` also predicts.

    Each prompt (row of (N, P)) is continued greedily by `dense`; that continuation is teacher-forced
    into `candidate`, whose argmax is compared position by position. Teacher forcing keeps one
    early divergence from deciding every later position.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    matches = 0
    for prompt in tqdm(prompts, desc="greedy agreement", unit="prompt", disable=not progress):
        continuation = _greedy_continuation(dense, prompt[None], new_tokens)
        predicted = _teacher_forced_logits(candidate, prompt[None], continuation).argmax(dim=-1)
        matches += int((predicted == continuation).sum())
    return matches / (prompts.shape[0] * new_tokens)


def kv_bytes_per_token(cache) -> tuple[float, float]:
    """(K, V) bytes the cache holds per token of one sequence: a CompressedKVCache or a transformers cache."""
    if isinstance(cache, CompressedKVCache):
        k_bytes, v_bytes, batch = cache.k_nbytes, cache.v_nbytes, cache.batch_size
    else:
        k_bytes = sum(layer.keys.nbytes for layer in cache.layers)
        v_bytes = sum(layer.values.nbytes for layer in cache.layers)
        batch = cache.layers[0].keys.shape[0]
    tokens = batch * cache.get_seq_length()
    return k_bytes / tokens, v_bytes / tokens


def kept_k_fraction(plan: Plan, shape: ModelShape) -> float:
    """Share of the model's post-RoPE key channels (all layers and KV heads) that the plan keeps."""
    per_layer = shape.num_kv_heads * shape.head_dim
    kept = sum(sum(plan.kept_counts(layer)) if layer in plan.k_channels else per_layer for layer in range(shape.num_layers))
    return kept / (per_layer * shape.num_layers)


def _teacher_forced_logits(model, prefix: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Logits predicting each token of `continuation` (B, C) after `prefix` (B, P): (B, C, vocab).

    The prefix is prefilled; the continuation is fed one token per decode step, its last token
    never (nothing after it is predicted).
    """
    out = model(prefix, use_cache=True)
    logits = [out.logits[:, -1]]
    for token in continuation[:, :-1].split(1, dim=1):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def _greedy_continuation(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The `new_tokens` (B, new_tokens) that greedy decoding appends to `prompt`; EOS does not stop it."""
    out = model(prompt, use_cache=True)
    tokens = [out.logits[:, -1].argmax(dim=-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(dim=-1, keepdim=True))
    return torch.cat(tokens, dim=1)
