"""transformers' `generate` and `pipeline` on a transformed model, against the dense model's own.

A keep-everything plan must give the dense model's tokens exactly, whatever the decoding strategy;
a pruning plan the tokens of the dense model running the masked reference attention
(masked_reference.py), which shares no code with kvcompile.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import kvcompile
from kvcompile import CompressedKVCache, Plan
from kvcompile.capture import CACHE_NAME
from tests.masked_reference import Windows, masked_attention
from tests.tiny_models import byte_level_tokenizer, make_tiny_model

PRUNE = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]})
WINDOWED = PRUNE.with_windows(sink=2, recent=3, buffer=2)
PLANS = {"pruned": PRUNE, "windowed": WINDOWED}

STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9),
    "beams": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "penalties": dict(repetition_penalty=1.5, no_repeat_ngram_size=2, do_sample=False),
}


def _keep_everything(model) -> Plan:
    cfg = model.config
    return Plan.from_k_channels({layer: [list(range(cfg.head_dim))] * cfg.num_key_value_heads
                                 for layer in range(cfg.num_hidden_layers)})


@functools.cache
def _transformed(arch: str, plan: str = "keep everything"):
    """A tiny model and its transform under a plan of `PLANS` (by name), built once per module."""
    model = make_tiny_model(arch)
    return model, kvcompile.transform(model, PLANS.get(plan) or _keep_everything(model))


def _prompt(batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(batch: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = _prompt(batch, length, seed)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _generate_both(dense_generate, tm, inputs, **settings):
    """Each model's generate from the same global seed (sampling draws from it)."""
    torch.manual_seed(0)
    want = dense_generate(**inputs, **settings)
    torch.manual_seed(0)
    return want, tm.generate(**inputs, **settings)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_keep_everything_plan_generates_the_dense_models_tokens(strategy):
    model, tm = _transformed("llama")
    want, got = _generate_both(model.generate, tm, _left_padded(), max_new_tokens=10, **STRATEGIES[strategy])
    assert got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("plan, strategy", [("pruned", "sampling"), ("windowed", "greedy"), ("windowed", "beams")])
def test_a_pruning_plan_generates_the_masked_references_tokens(plan, strategy):
    """Beam search reorders the compressed cache's rows (and their window counts) every step."""
    model, tm = _transformed("qwen2", plan)
    windows = Windows(tm.plan.sink, tm.plan.recent, tm.plan.buffer) if tm.plan.windowed else None
    inputs = {"input_ids": _prompt()}  # unpadded: the reference's windows count a row's past with its padding

    def reference(**kwargs):
        with masked_attention(model, tm.plan.k_channels, windows):
            return model.generate(**kwargs)

    want, got = _generate_both(reference, tm, inputs, max_new_tokens=12, **STRATEGIES[strategy])
    assert torch.equal(got, want)


class _BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.tensor([self.token], device=scores.device), float("-inf"))


class _StopAtLength(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


class _CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def test_logits_processors_stopping_criteria_streamers_and_generation_config():
    model, tm = _transformed("llama")
    inputs = {"input_ids": _prompt(batch=1)}
    dense_greedy = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    banned = int(dense_greedy[0, -1])
    config = transformers.GenerationConfig(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    settings = dict(generation_config=config, logits_processor=LogitsProcessorList([_BanToken(banned)]),
                    stopping_criteria=StoppingCriteriaList([_StopAtLength(16)]))
    streamers = _CollectingStreamer(), _CollectingStreamer()
    want, got = (generate(**inputs, **settings, streamer=streamer)
                 for generate, streamer in zip((model.generate, tm.generate), streamers))
    assert torch.equal(got, want)
    assert got.shape == (1, 16) and banned not in got[0, 9:].tolist()
    streamed = [chunk for chunk in streamers[1].chunks if chunk is not None]
    assert torch.equal(torch.cat([chunk.flatten() for chunk in streamed]), got[0])  # the prompt, then each token
    assert streamers[1].chunks[-1] is None  # ended


def test_generate_returns_the_compressed_cache_and_continues_it():
    _, tm = _transformed("qwen2", "windowed")
    prompt = _prompt(batch=2)
    out = tm.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out.past_key_values, CompressedKVCache) and len(out.scores) == 5
    assert out.past_key_values.row_lengths == [prompt.shape[1] + 4] * 2  # the last token is returned, not cached
    # a later generate on the returned cache runs only the tokens the cache lacks
    continued = tm.generate(out.sequences, **{CACHE_NAME: getattr(out, CACHE_NAME)}, max_new_tokens=6, do_sample=False)
    assert torch.equal(continued, tm.generate(prompt, max_new_tokens=11, do_sample=False))


def test_pipeline_and_a_tokenizers_batch_give_the_dense_models_text(capsys):
    model = make_tiny_model("llama", vocab_size=256, pad_token_id=255, eos_token_id=254)
    tokenizer = byte_level_tokenizer(pad_token="\u0100", eos_token="\u00ff")
    tokenizer.padding_side = "left"
    tm = kvcompile.transform(model, _keep_everything(model))
    prompts = ["kv caches", "a compiler for the kv cache of llms"]
    settings = dict(max_new_tokens=8, do_sample=False)
    # device given: on a CUDA machine a pipeline would otherwise move its model to cuda:0
    want, got = (transformers.pipeline("text-generation", model=m, tokenizer=tokenizer, device=m.device)(
                     prompts, **settings) for m in (model, tm))
    assert got == want and all(row[0]["generated_text"].startswith(p) for row, p in zip(got, prompts))

    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    streamer = transformers.TextStreamer(tokenizer, skip_prompt=True)
    tokens = tm.generate(**tokenizer(prompts[:1], return_tensors="pt"), streamer=streamer, **settings)
    assert capsys.readouterr().out.strip() == tokenizer.decode(tokens[0, -8:]).strip()
    assert torch.equal(tm.generate(**batch, **settings), model.generate(**batch, **settings))


def test_generate_refuses_caches_the_transformed_model_cannot_run_on():
    _, tm = _transformed("qwen2", "pruned")
    inputs = _left_padded(batch=2)
    with pytest.raises(ValueError, match="keeps its plan's compressed cache"):
        tm.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(TypeError, match="CompressedKVCache.*got DynamicCache"):
        tm.generate(**inputs, max_new_tokens=2, **{CACHE_NAME: DynamicCache()})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_continues_a_padded_batchs_cache_as_the_dense_model_does(arch):
    """A chat's second turn: generate on a left-padded batch (every row padded), then generate again
    on its sequences followed by a next turn of a different length per row (padded inside the turn,
    so between the first turn and the second), continuing the returned cache, whose rows hold
    different numbers of tokens. A keep-everything plan gives the dense model's tokens, continuing
    its own cache, at both turns; each row's cache holds exactly its real tokens."""
    model, tm = _transformed(arch)
    settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    inputs = _left_padded()
    inputs["attention_mask"][:, 0] = 0  # every row padded: the cache's longest row is shorter than the mask
    first = {name: model.generate(**inputs, **settings) for name, model in (("dense", model), ("tm", tm))}
    assert torch.equal(first["tm"].sequences, first["dense"].sequences)
    turn = _prompt(batch=3, length=3, seed=5)
    turn_mask = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    sequences = first["tm"].sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones(3, sequences.shape[1] - 9, dtype=torch.long), turn_mask], 1)
    second = {name: model.generate(torch.cat([sequences, turn.masked_fill(turn_mask == 0, 0)], 1), attention_mask=mask,
                                   **{CACHE_NAME: getattr(first[name], CACHE_NAME)}, **settings)
              for name, model in (("dense", model), ("tm", tm))}
    assert torch.equal(second["tm"].sequences, second["dense"].sequences)
    cache, dense_cache = getattr(second["tm"], CACHE_NAME), getattr(second["dense"], CACHE_NAME)
    assert cache.row_lengths == (mask.sum(1) + settings["max_new_tokens"] - 1).tolist()
    assert cache.get_seq_length() == cache.copy().get_seq_length() == dense_cache.get_seq_length()
