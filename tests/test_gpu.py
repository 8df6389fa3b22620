"""transform on a CUDA device: programs, cache and index constants live where the model lives."""

import pytest
import torch

import kvcompile
from tests.masked_reference import masked_reference_decode
from tests.test_runtime import PRUNE, _prompt, _transformed_decode
from tests.tiny_models import make_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_pruning_plan_on_cuda_matches_masked_reference(arch):
    model = make_tiny_model(arch).cuda()
    prompt = _prompt(2).cuda()
    want_logits, want_tokens = masked_reference_decode(model, prompt, PRUNE.k_channels, steps=10)
    tm = kvcompile.transform(model, PRUNE)
    got_logits, got_tokens = _transformed_decode(tm, prompt, steps=10)
    assert got_logits[-1].device.type == "cuda"
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tokens, want_tokens)


def test_bf16_cache_is_bf16_and_counted_as_such():
    model = make_tiny_model("qwen2", dtype=torch.bfloat16).cuda()
    tm = kvcompile.transform(model, PRUNE)
    cache = tm(_prompt(2).cuda()).past_key_values
    assert all(t.dtype == torch.bfloat16 and t.is_cuda for t in cache.entries.values())
    assert cache.nbytes == PRUNE.cache_nbytes(tm.shape, torch.bfloat16, batch=2, length=12)

