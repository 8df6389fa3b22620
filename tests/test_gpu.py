"""transform on a CUDA device: programs, cache and index constants live where the model lives."""

import pytest
import torch

import kvcompile
from kvcompile.capture import CACHE_NAME
from kvcompile.graphs import ReplayedCalls
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



@pytest.mark.parametrize("kind", ["pruned", "windowed"])
def test_padded_batch_on_cuda_decodes_each_row_as_alone(kind):
    """The per-row lengths through the Triton kernels (one query token: every decode step)."""
    from tests.test_padded_batches import K_CHANNELS, _greedy_logits, _padded, _rows

    plan = kvcompile.Plan.from_k_channels(K_CHANNELS, **({"sink": 2, "recent": 4, "buffer": 4} if kind == "windowed" else {}))
    tm = kvcompile.transform(make_tiny_model("llama", num_layers=3).cuda(), plan)
    rows = [row.cuda() for row in _rows()]
    ids, mask = _padded(rows, "left")
    batched, cache = _greedy_logits(tm, ids, mask)
    assert cache.lengths.is_cuda
    for i, row in enumerate(rows):
        alone, _ = _greedy_logits(tm, row[None])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["pruned", "windowed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_decode_steps_equal_the_eager_ones(kind, dtype):
    """CUDA graphs are on by default on CUDA; replayed steps of the program as it is (window moves and
    capacity growth between them) compute what the op-by-op program computes: equal in fp32, within
    1e-3 relative in bf16."""
    from tests.test_padded_batches import _greedy_logits, _padded, _rows

    model = make_tiny_model("llama", num_layers=3, dtype=dtype).cuda()
    plan = _plan(kind)
    graphed = kvcompile.transform(model, plan, compile_decode=False)
    eager = kvcompile.transform(model, plan, cuda_graphs=False)
    assert graphed._graphed_decode is not None and eager._graphed_decode is None
    ids, mask = _padded([row.cuda() for row in _rows()], "left")
    want, _ = _greedy_logits(eager, ids, mask, steps=70)  # passes the default capacity of 64: the buffers grow
    got, cache = _greedy_logits(graphed, ids, mask, steps=70)
    tolerance = 0.0 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance * want.abs().max().item(), rtol=tolerance)
    assert len(graphed._graphed_decode._steps) >= 2  # captured again once the buffers grew


@pytest.mark.parametrize("kind", ["pruned", "windowed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_graphed_decode_steps_match_the_eager_ones(kind, dtype):
    """The default: graphs replay the decode program compiled by inductor. Fed the same tokens, its
    steps match the op-by-op program's across window moves, capacity growth and a second batch size:
    within 1e-4 relative in fp32 (inductor reorders and fuses float math); in bf16, where rounding
    differences compound through the cache over 70 steps, no further from the fp32 program's logits
    than the op-by-op bf16 program is (twice its relative error at most)."""
    from tests.test_padded_batches import _padded, _rows

    plan = _plan(kind)
    model = make_tiny_model("llama", num_layers=3, dtype=dtype).cuda()
    compiled, eager = kvcompile.transform(model, plan), kvcompile.transform(model, plan, cuda_graphs=False)
    exact = kvcompile.transform(make_tiny_model("llama", num_layers=3).cuda(), plan, cuda_graphs=False)
    rows = [row.cuda() for row in _rows()]
    for batch in (rows, rows[:1]):
        ids, mask = _padded(batch, "left")
        tokens = torch.randint(3, model.config.vocab_size, (len(batch), 70), device="cuda")
        want, _ = _forced_logits(eager, ids, mask, tokens)
        got, cache = _forced_logits(compiled, ids, mask, tokens)
        assert cache.length == ids.shape[1] + tokens.shape[1]
        _assert_as_close_as_the_runtime(got, want, lambda: _forced_logits(exact, ids, mask, tokens)[0])
    assert len(compiled._graphed_decode._steps) >= 3  # the buffers grew, and another batch size


def _assert_as_close_as_the_runtime(got, want, fp32_truth):
    """`got` (compiled, graphed) against `want` (the op-by-op runtime, same dtype): within 1e-4
    relative in fp32; in bf16 no further from the fp32 program's logits (`fp32_truth()`) than `want`
    is, twice its relative error at most."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
        return
    truth = fp32_truth()
    error = lambda logits: ((logits.float() - truth).norm() / truth.norm()).item()  # noqa: E731
    assert 0 < error(got) <= 2 * error(want), (error(got), error(want))


def _plan(kind: str) -> kvcompile.Plan:
    from tests.test_padded_batches import K_CHANNELS

    from tests.test_update_projections import random_updates

    windows = {"sink": 2, "recent": 4, "buffer": 4} if kind in ("windowed", "healed") else {}
    plan = kvcompile.Plan.from_k_channels(K_CHANNELS, **windows)
    if kind == "healed":  # the factors stay on the CPU: the cache moves them to the model's device
        plan = plan.with_updates(random_updates(make_tiny_model("llama", num_layers=3), range(3), rank=2))
    return plan


def _forced_logits(tm, ids, mask, tokens):
    """The prompt's prefill, then one decode step per column of `tokens` (B, N): each step's logits."""
    out = tm(ids, attention_mask=mask, use_cache=True)
    history = []
    for step in range(tokens.shape[1]):
        out = tm(tokens[:, step : step + 1], past_key_values=out.past_key_values, use_cache=True)
        history.append(out.logits[:, -1])
    return torch.stack(history, dim=1), out.past_key_values


@pytest.mark.parametrize("cuda_graphs", ["inductor", "kvcompile"])
@pytest.mark.parametrize("kind", ["pruned", "windowed", "healed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_on_the_static_cache_with_cuda_graphs_matches_transform(kind, dtype, cuda_graphs):
    """torch.compile(backend="kvcompile", mode="reduce-overhead") on kvcompile.cache_for: the Triton
    kernels (the window a ring) in CUDA graphs, inductor's or kvcompile's. Fed the same tokens for 70
    steps, as close to the op-by-op runtime as inductor's graphs of it are (test above)."""
    plan = _plan(kind)
    model = make_tiny_model("llama", num_layers=3, dtype=dtype).cuda()
    eager = kvcompile.transform(model, plan, cuda_graphs=False)
    exact = kvcompile.transform(make_tiny_model("llama", num_layers=3).cuda(), plan, cuda_graphs=False)
    ids = _prompt(2).cuda()
    tokens = torch.randint(3, model.config.vocab_size, (2, 70), device="cuda")
    want, _ = _forced_logits(eager, ids, None, tokens)
    torch._dynamo.reset()
    cache = kvcompile.cache_for(model, plan, batch_size=2, max_cache_len=ids.shape[1] + tokens.shape[1])
    compiled = torch.compile(model, backend="kvcompile", fullgraph=True,
                             options={"mode": "reduce-overhead", "cuda_graphs": cuda_graphs})
    with torch.no_grad():
        compiled(ids, **{CACHE_NAME: cache})
        got = torch.stack([compiled(tokens[:, i : i + 1], **{CACHE_NAME: cache}).logits[:, -1].clone()
                           for i in range(tokens.shape[1])], dim=1)
    assert cache.row_lengths == [ids.shape[1] + tokens.shape[1]] * 2
    _assert_as_close_as_the_runtime(got, want, lambda: _forced_logits(exact, ids, None, tokens)[0])
    torch._dynamo.reset()


def test_replayed_calls_run_each_step_once_and_keep_what_they_returned():
    """The backend's CUDA graphs of a step: a state tensor changed in place (as the cache is) moves
    once per call, whether the call ran as it is, was captured or replayed; a per-step input given
    broadcast (a position expanded over the batch) is copied in; returned tensors stay as returned."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(4, 4, device="cuda", generator=generator)
    count = torch.zeros((), device="cuda")

    def step(weight, count, x, position):
        count.add_(1)
        return (x @ weight + count + position,)

    calls = ReplayedCalls(step, static=[True, True, False, False])
    xs = [torch.randn(2, 4, device="cuda", generator=generator) for _ in range(6)]
    outs = [calls(weight, count, x, torch.tensor([[10.0 * i]], device="cuda").expand(2, 1))[0] for i, x in enumerate(xs)]
    assert count.item() == len(xs) and calls.captured == 1
    for i, (x, out) in enumerate(zip(xs, outs)):
        torch.testing.assert_close(out, x @ weight + (i + 1) + 10.0 * i)


def test_replayed_calls_never_capture_a_step_that_writes_its_per_step_input():
    weight = torch.randn(4, 4, device="cuda")

    def step(weight, x):
        x.mul_(2)
        return (x @ weight,)

    calls = ReplayedCalls(step, static=[True, False])
    for _ in range(4):
        x = torch.ones(2, 4, device="cuda")
        out = calls(weight, x)[0]
        assert torch.equal(x, torch.full_like(x, 2))
        torch.testing.assert_close(out, x @ weight)
    assert calls.captured == 0


@pytest.mark.parametrize("cuda_graphs", ["inductor", "kvcompile"])
def test_transformers_generate_on_the_static_cache_with_cuda_graphs(cuda_graphs, monkeypatch):
    """A left-padded batch through transformers' generate, the forward compiled with CUDA graphs: the
    tokens of kvcompile.transform's generate. The decode step, though its mask grows, is one graph
    of static shapes: kvcompile's own CUDA graphs capture it once and replay it."""
    from tests.test_padded_batches import _padded, _rows

    made = []

    class RecordedCalls(ReplayedCalls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(kvcompile.backend, "ReplayedCalls", RecordedCalls)

    plan = _plan("windowed")
    model = make_tiny_model("llama", num_layers=3).cuda()
    ids, mask = _padded([row.cuda() for row in _rows()], "left")
    want = kvcompile.transform(model, plan).generate(ids, attention_mask=mask, max_new_tokens=40)
    torch._dynamo.reset()
    cache = kvcompile.cache_for(model, plan, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + 40)
    model.forward = torch.compile(model.forward, backend="kvcompile",
                                  options={"mode": "reduce-overhead", "cuda_graphs": cuda_graphs})
    try:
        got = model.generate(input_ids=ids, attention_mask=mask, **{CACHE_NAME: cache}, max_new_tokens=40,
                             do_sample=False)
    finally:
        del model.forward
        torch._dynamo.reset()
    assert torch.equal(got, want)
    if cuda_graphs == "kvcompile":
        assert sum(calls.captured for calls in made) == 1  # the prompt runs once, uncaptured


def test_a_plan_with_updates_on_the_cpu_updates_a_model_on_cuda():
    from tests.test_update_projections import random_updates

    model = make_tiny_model("llama")
    plan = PRUNE.with_updates(random_updates(model, [0, 1]))  # its factors stay on the CPU
    prompt = _prompt(2)
    with torch.no_grad():
        want = kvcompile.transform(model, plan)(prompt).logits
        got = kvcompile.transform(model.cuda(), plan)(prompt.cuda()).logits
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
