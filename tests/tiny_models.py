"""Random-weight tiny causal LMs of the architectures kvcompile supports, for fast CPU tests.

All share one shape: vocab 128, hidden 64, 4 query heads, 2 KV heads (GQA groups of 2), head_dim 16,
intermediate 128. Weights are re-drawn with a large std so that attention is peaked and dropping
query/key channels visibly moves the logits (HF's default init, std 0.02, gives near-uniform
attention, against which a wrong pruning would go unnoticed).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
# OPT: learned positions (no RoPE), multi-head attention (4 KV heads), q pre-scaled, biases
WITHOUT_ROPE = ("opt",)
# Sliding-window attention in some layers (pass `sliding_window` and `layer_types` as overrides):
# Gemma-3 (QK-norm, a local RoPE base for sliding layers), Cohere2 (interleaved RoPE on sliding
# layers, none on global ones, parallel attention and MLP)
HYBRID = ("gemma3", "cohere2")

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "cohere2": (transformers.Cohere2Config, transformers.Cohere2ForCausalLM),
}

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_EXTRA = {
    "llama": dict(attention_bias=False),
    "mistral": dict(sliding_window=None),
    # Qwen2 hard-codes bias on q/k/v (there is no config switch); checked below.
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(attention_bias=False, use_sliding_window=False),
    "phi3": dict(original_max_position_embeddings=512, sliding_window=None),
    # OPT names its sizes differently and has no GQA
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, enable_bias=True),
    "gemma3": dict(query_pre_attn_scalar=16),
    "cohere2": dict(),
}
_NOT_FOR = {"opt": ("num_key_value_heads", "head_dim", "intermediate_size")}

# std of the re-drawn weights. With RMS-normalised inputs (rms 1, width 64), q and k entries get
# std ~ 0.25 * 8 = 2, so q.k / sqrt(16) has std ~ 4: far from uniform attention, logits still O(1-10).
_WEIGHT_STD = 0.25
# Qwen3 re-normalises q and k per head (QK-norm), which undoes a large projection std; a gain on the
# norm weights restores peaked attention.
_QK_NORM_GAIN = 2.0


def slow_unless(values, default) -> list:
    """pytest params of `values` (single values or tuples), marked `slow` unless in `default`: a case
    the default suite runs on some architectures, the rest only in the full run (`-m ""`)."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=() if v in default else pytest.mark.slow)
            for v in values]


def make_tiny_model(
    arch: str, *, num_layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> transformers.PreTrainedModel:
    """A `num_layers`-layer random `arch` causal LM (sdpa attention, eval mode), identical for equal
    `seed`; `overrides` are config fields (`sliding_window=4`, ...)."""
    if arch not in _CLASSES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES + WITHOUT_ROPE + HYBRID}")
    config_cls, model_cls = _CLASSES[arch]
    common = {k: v for k, v in _COMMON.items() if k not in _NOT_FOR.get(arch, ())}
    fields = {**common, **_EXTRA[arch], **overrides}
    config = config_cls(**fields, num_hidden_layers=num_layers, attn_implementation="sdpa")
    # The initial HF init is overwritten below; fork the RNG so building a model never moves the
    # caller's global torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    _reinit(model, seed)
    _check_structure(arch, model)
    return model.to(dtype).eval()


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            param.copy_(_QK_NORM_GAIN * (1 + 0.2 * torch.randn(param.shape, generator=gen)))
        elif "norm" in name:
            # RMSNorm gains: around 1, slightly varied so channels are not interchangeable.
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
        else:
            # Linear weights, embeddings and the Qwen2 q/k/v biases.
            param.copy_(_WEIGHT_STD * torch.randn(param.shape, generator=gen))


def _check_structure(arch: str, model: transformers.PreTrainedModel) -> None:
    if arch == "opt":
        assert not any("rotary" in name for name, _ in model.named_modules()), "opt: unexpected rotary embedding"
        return
    attn = model.model.layers[0].self_attn
    if arch == "qwen2":
        assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")), "qwen2: no qkv bias"
    if arch == "qwen3":
        assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm"), "qwen3: no QK-norm"
    if arch == "phi3":
        assert hasattr(attn, "qkv_proj"), "phi3: no fused qkv_proj"


def byte_level_tokenizer(**special_tokens) -> PreTrainedTokenizerFast:
    """One token per byte (256 tokens, no merges): real text for a tiny model's 256-token vocabulary."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    byte_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=byte_level, **special_tokens)
