"""Inputs a new user gets wrong, each refused clearly before any work or handled correctly.

Cases from a red-team pass over the runtime's entry points (issue "nothing lost, nothing silently
wrong"); each test names the case it reproduces.
"""

import re

import pytest
import torch

import kvcompile
from tests.test_runtime import PRUNE, _prompt
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tm():
    return kvcompile.transform(make_tiny_model("llama"), PRUNE)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_input_ids_are_refused_by_shape(tm, shape):
    with pytest.raises(ValueError, match=re.escape(f"input_ids must be (batch, seq) with batch, seq >= 1, got shape {shape}")):
        tm(torch.zeros(shape, dtype=torch.long))


def test_top_p_zero_keeps_the_most_likely_token(tm):
    """top_p = 0 keeps the one most likely token (transformers' convention): sampling is greedy."""
    prompt = _prompt(2)
    greedy = tm.generate(prompt, max_new_tokens=6)
    sampled = tm.generate(prompt, max_new_tokens=6, do_sample=True, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_top_k_zero_means_no_top_k_filtering(tm):
    """top_k = 0 disables top-k (transformers' convention) instead of crashing: the same draws as None."""
    prompt = _prompt(2)
    draws = [tm.generate(prompt, max_new_tokens=6, do_sample=True, top_k=k, generator=torch.Generator().manual_seed(1))
             for k in (0, None)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], tm.generate(prompt, max_new_tokens=6))  # sampling, so the check can fail


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\], got 1.5"),
        ({"top_p": -0.1}, r"top_p must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": float("nan")}, "temperature must be > 0"),
    ],
)
def test_bad_sampling_settings_fail_before_the_prefill(tm, monkeypatch, settings, message):
    def no_prefill(*args, **kwargs):
        raise AssertionError("the prompt was run before the settings were checked")

    monkeypatch.setattr(tm, "forward", no_prefill)
    with pytest.raises(ValueError, match=message):
        tm.generate(_prompt(1), max_new_tokens=3, do_sample=True, **settings)


def test_a_model_without_weights_is_refused_at_transform():
    """A meta-device model (built without weights) fails at transform with the reason, not later."""
    model = make_tiny_model("llama").to("meta")
    with pytest.raises(ValueError, match="meta device"):
        kvcompile.transform(model, PRUNE)


def test_a_model_converted_after_transform_is_refused_by_name():
    """`model.half()` after transform: the programs share its parameters, so the next call says what
    changed and what to do instead of failing inside a matmul on mixed dtypes."""
    model = make_tiny_model("llama")
    tm = kvcompile.transform(model, PRUNE)
    model.half()
    with pytest.raises(RuntimeError, match=r"transformed in torch.float32 on cpu and is now in torch.float16 on cpu"):
        tm(_prompt(1))
    model.float()
    assert tm(_prompt(1)).logits.dtype == torch.float32  # converted back, it runs again
