"""The Triton decode kernels (kernels/triton_decode.py) against the reference ops
`kvcompile::windowed_attention` and `kvcompile::pruned_attention`, for one query token and no mask,
over whole tensors or over each row's first `lengths` slots of a cache written in place.

Without CUDA the kernels run under the Triton interpreter on CPU (tests/conftest.py turns it on
before anything imports triton), so shapes stay tiny. The forced split (`block_tokens=16,
splits=4`) gives every KV head four programs, sharing its regions by bytes, so pieces of several
blocks with a partial last block, empty pieces, the slot layout and the fused log-sum-exp combine
are all exercised even at these lengths.
"""

import pytest
import torch

pytest.importorskip("triton")

import kvcompile  # noqa: E402
import kvcompile.kernels  # noqa: E402,F401  (registers torch.ops.kvcompile.*)
from kvcompile.kernels import triton_decode  # noqa: E402
from tests.tiny_models import slow_unless  # noqa: E402

ops = torch.ops.kvcompile
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 16
SINK = 3  # no effect without a mask, but passed as the runtime would
FORCED_SPLIT = {"block_tokens": 16, "splits": 4}

# kept channel counts per KV head (Hkv = 4)
PLANS = {
    # head 0 keeps every channel, heads 1 and 3 share a width, head 2 keeps none (streaming)
    "mixed": (16, 5, 0, 5),
    # three widths, no streaming head
    "no-streaming": (3, 8, 8, 1),
    # every head streaming: windowed sees the window only, pruned attends uniformly
    "all-streaming": (0, 0, 0, 0),
}


def _groups(counts, generator):
    """Width groups as `kvcompile.cache.k_groups` builds them (widest first), with random
    channels in random order: [(heads (G,), channels (G, w))]."""
    kept = [torch.randperm(D, generator=generator)[:n] for n in counts]
    groups = []
    for width in sorted({n for n in counts if n}, reverse=True):
        heads = [h for h, n in enumerate(counts) if n == width]
        groups.append((torch.tensor(heads), torch.stack([kept[h] for h in heads])))
    return groups


def _randn(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator) * scale


def _windowed_inputs(counts, group_size, batch, window, middle, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = len(counts)
    groups = _groups(counts, g)
    heads = [h for h, _ in groups]
    channels = [c for _, c in groups]
    middle_value_heads = sum(h.numel() for h in heads)
    return dict(
        q=_randn(g, batch, hkv * group_size, 1, D, scale=2.0),  # x2: a peaked softmax, not a mean
        k_window=_randn(g, batch, hkv, window, D),
        v_window=_randn(g, batch, hkv, window, D),
        k_middle=[_randn(g, batch, c.shape[0], middle, c.shape[1]) for c in channels],
        heads=heads,
        channels=channels,
        v_middle=_randn(g, batch, middle_value_heads, middle, D),
    )


def _pruned_inputs(counts, group_size, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = len(counts)
    groups = _groups(counts, g)
    channels = [c for _, c in groups]
    return dict(
        q=_randn(g, batch, hkv * group_size, 1, D, scale=2.0),
        k_groups=[_randn(g, batch, c.shape[0], length, c.shape[1]) for c in channels],
        heads=[h for h, _ in groups],
        channels=channels,
        v=_randn(g, batch, hkv, length, D),
    )


def _to(inputs, dtype=None, device=DEVICE):
    """Inputs on `device`, floating tensors in `dtype` (index tensors untouched)."""

    def move(x):
        if isinstance(x, list):
            return [move(t) for t in x]
        return x.to(device, dtype) if x.is_floating_point() and dtype is not None else x.to(device)

    return {name: move(x) for name, x in inputs.items()}


def _windowed_reference(x, window_lengths=None, middle_lengths=None):
    return ops.windowed_attention(
        x["q"], x["k_window"], x["v_window"], x["k_middle"], x["heads"], x["channels"], x["v_middle"],
        None, D**-0.5, False, SINK, window_lengths, middle_lengths,
    )  # fmt: skip


def _windowed_triton(x, **knobs):
    return triton_decode.windowed_decode(
        x["q"], x["k_window"], x["v_window"], x["k_middle"], x["heads"], x["channels"], x["v_middle"],
        D**-0.5, SINK, **knobs,
    )  # fmt: skip


def _pruned_reference(x, lengths=None):
    return ops.pruned_attention(x["q"], x["k_groups"], x["heads"], x["channels"], x["v"], None, D**-0.5, False, lengths)


def _pruned_triton(x, **knobs):
    return triton_decode.pruned_decode(x["q"], x["k_groups"], x["heads"], x["channels"], x["v"], D**-0.5, **knobs)


def _assert_fp32_close(out, expected):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# (batch, window tokens, middle tokens): an empty middle (the first decode steps), then lengths
# that are no multiple of the 16-token block
WINDOWED_SHAPES = [(1, 7, 0), (3, 21, 37), (1, 33, 90)]


@pytest.mark.parametrize("group_size", slow_unless([1, 2, 3], default=(1, 3)))
@pytest.mark.parametrize("plan", ["mixed", "no-streaming"])
@pytest.mark.parametrize("batch, window, middle", WINDOWED_SHAPES)
def test_windowed_decode_matches_reference_fp32(group_size, plan, batch, window, middle):
    x = _to(_windowed_inputs(PLANS[plan], group_size, batch, window, middle))
    _assert_fp32_close(_windowed_triton(x, **FORCED_SPLIT), _windowed_reference(x))


# (batch, tokens)
PRUNED_SHAPES = [(1, 9), (3, 50), (1, 95)]


@pytest.mark.parametrize("group_size", slow_unless([1, 2, 3], default=(1, 3)))
@pytest.mark.parametrize("plan", ["mixed", "no-streaming"])
@pytest.mark.parametrize("batch, length", PRUNED_SHAPES)
def test_pruned_decode_matches_reference_fp32(group_size, plan, batch, length):
    x = _to(_pruned_inputs(PLANS[plan], group_size, batch, length))
    _assert_fp32_close(_pruned_triton(x, **FORCED_SPLIT), _pruned_reference(x))


def test_all_streaming_heads():
    # no width group at all: windowed attends over the window only, pruned uniformly over T
    x = _to(_windowed_inputs(PLANS["all-streaming"], 2, 3, 21, 37))
    assert x["heads"] == [] and x["v_middle"].shape[1] == 0
    _assert_fp32_close(_windowed_triton(x, **FORCED_SPLIT), _windowed_reference(x))
    x = _to(_pruned_inputs(PLANS["all-streaming"], 2, 3, 50))
    out = _pruned_triton(x, **FORCED_SPLIT)
    _assert_fp32_close(out, _pruned_reference(x))
    _assert_fp32_close(out, x["v"].mean(2, keepdim=True).repeat_interleave(2, dim=1))


@pytest.mark.parametrize("group_size", [1, 3])
def test_default_splits(group_size):
    # the device-sized split the runtime would use (one chunk per region under the interpreter)
    x = _to(_windowed_inputs(PLANS["mixed"], group_size, 3, 33, 90))
    _assert_fp32_close(_windowed_triton(x), _windowed_reference(x))
    x = _to(_pruned_inputs(PLANS["mixed"], group_size, 3, 95))
    _assert_fp32_close(_pruned_triton(x), _pruned_reference(x))


def test_a_combine_in_several_rounds(monkeypatch):
    # two slots a round (the device's default takes up to 32 of batch 1's slots a round): five
    # splits combine in three rounds, the last one partial
    monkeypatch.setattr(triton_decode, "_COMBINE_ELEMENTS", 2 * 4 * D)  # slots x query heads (3 -> 4) x D
    x = _to(_windowed_inputs(PLANS["mixed"], 3, 2, 33, 90))
    _assert_fp32_close(_windowed_triton(x, block_tokens=16, splits=5), _windowed_reference(x))
    x = _to(_pruned_inputs(PLANS["no-streaming"], 3, 2, 95))
    _assert_fp32_close(_pruned_triton(x, block_tokens=16, splits=5), _pruned_reference(x))


def test_strided_inputs_and_other_value_dim():
    # every input a strided view of a larger buffer (as a fused qkv projection or a preallocated
    # cache would give), and a value head dim other than the key's
    group_size, batch, window, middle, value_dim = 3, 3, 21, 37, 8
    x = _to(_windowed_inputs(PLANS["mixed"], group_size, batch, window, middle))
    x["q"] = torch.cat([x["q"], x["q"]], dim=-1)[..., :D]
    x["k_window"] = torch.cat([x["k_window"], x["k_window"]], dim=2)[:, :, ::2]
    x["v_window"] = x["v_window"][..., :value_dim]
    x["v_middle"] = x["v_middle"][..., :value_dim]
    x["k_middle"] = [torch.cat([k, k], dim=-1)[..., : k.shape[-1]] for k in x["k_middle"]]
    assert not (x["q"].is_contiguous() or x["k_window"].is_contiguous() or x["v_window"].is_contiguous())
    _assert_fp32_close(_windowed_triton(x, **FORCED_SPLIT), _windowed_reference(x))


# 16-bit: compared with the reference on the same values in fp32. The kernel rounds the softmax
# probabilities to the value dtype for p @ v (on GPU) and the output once, so a few ulps of slack.
TOLERANCE_16 = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    tol = TOLERANCE_16[dtype]
    x = _to(_windowed_inputs(PLANS["mixed"], 3, 3, 21, 37), dtype)
    out = _windowed_triton(x, **FORCED_SPLIT)
    assert out.dtype == dtype and out.shape == (3, 12, 1, D)
    expected = _windowed_reference(_to(x, torch.float32))
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)

    x = _to(_pruned_inputs(PLANS["mixed"], 3, 3, 50), dtype)
    out = _pruned_triton(x, **FORCED_SPLIT)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _pruned_reference(_to(x, torch.float32)), atol=tol, rtol=tol)


# Caches written in place: capacity-sized tensors, each row valid up to its own length, NaN after it
# (any garbage the kernels read would show). With the forced split, a row shorter than a chunk
# leaves whole chunks empty (the combine's -inf partials), and middle length 0 a row with no
# middle at all while the other rows have one.
WINDOW_LENGTHS, MIDDLE_LENGTHS = [21, 4, 13], [0, 37, 20]  # of capacities 21 and 37
PRUNED_LENGTHS = [50, 9, 33]  # of capacity 50: 33 is a last chunk of a single token


def _with_garbage(x, lengths):
    """x (B, H, C, d), or a list of them, NaN in the slots at or beyond each row's length."""
    if isinstance(x, list):
        return [_with_garbage(t, lengths) for t in x]
    beyond = torch.arange(x.shape[2], device=x.device) >= lengths[:, None]
    return x.masked_fill(beyond[:, None, :, None], float("nan"))


def _ragged_windowed_inputs(plan, group_size, dtype=None, lengths_dtype=torch.int64):
    x = _to(_windowed_inputs(PLANS[plan], group_size, 3, 21, 37), dtype)
    window_lengths = torch.tensor(WINDOW_LENGTHS, dtype=lengths_dtype, device=DEVICE)
    middle_lengths = torch.tensor(MIDDLE_LENGTHS, dtype=lengths_dtype, device=DEVICE)
    for name in ("k_window", "v_window"):
        x[name] = _with_garbage(x[name], window_lengths)
    for name in ("k_middle", "v_middle"):
        x[name] = _with_garbage(x[name], middle_lengths)
    return x, window_lengths, middle_lengths


def _ragged_pruned_inputs(plan, group_size, dtype=None, lengths_dtype=torch.int64):
    x = _to(_pruned_inputs(PLANS[plan], group_size, 3, 50), dtype)
    lengths = torch.tensor(PRUNED_LENGTHS, dtype=lengths_dtype, device=DEVICE)
    for name in ("k_groups", "v"):
        x[name] = _with_garbage(x[name], lengths)
    return x, lengths


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("plan", PLANS)
def test_windowed_decode_with_ragged_lengths(group_size, plan):
    x, window_lengths, middle_lengths = _ragged_windowed_inputs(plan, group_size)
    out = _windowed_triton(x, window_lengths=window_lengths, middle_lengths=middle_lengths, **FORCED_SPLIT)
    _assert_fp32_close(out, _windowed_reference(x, window_lengths, middle_lengths))


def _as_ring(window, start):
    """A window (B, H, Tw, d) whose slots after SINK are a ring of phase `start` (B,): logical slot
    j >= SINK moved to SINK + (j - SINK + start) % (Tw - SINK)."""
    slots = torch.arange(window.shape[2], device=window.device)
    physical = torch.where(slots < SINK, slots, SINK + (slots - SINK + start[:, None]) % (window.shape[2] - SINK))
    ring = torch.empty_like(window)
    return ring.scatter_(2, physical[:, None, :, None].expand_as(window), window)


@pytest.mark.parametrize("plan", ["mixed", "no-streaming"])
def test_windowed_decode_over_a_ring(plan):
    """The static cache's window (a ring after the sink): the kernel and the reference given the
    phase equal the reference over the same tokens laid out in order."""
    x, window_lengths, middle_lengths = _ragged_windowed_inputs(plan, 2)
    want = _windowed_reference(x, window_lengths, middle_lengths)
    period = x["k_window"].shape[2] - SINK
    start = torch.tensor([5, 3 * period + 17, 0], device=DEVICE)  # the cache passes the middle's count
    x = {**x, "k_window": _as_ring(x["k_window"], start), "v_window": _as_ring(x["v_window"], start)}
    lengths = {"window_lengths": window_lengths, "middle_lengths": middle_lengths, "window_start": start}
    _assert_fp32_close(_windowed_triton(x, **lengths, **FORCED_SPLIT), want)
    got = ops.windowed_attention(x["q"], x["k_window"], x["v_window"], x["k_middle"], x["heads"], x["channels"],
                                 x["v_middle"], None, D**-0.5, False, SINK, **lengths)
    _assert_fp32_close(got, want)


# a sliding layer's ring: 13 slots, a window of 11; row 0 has wrapped, row 1 holds more tokens than
# its window sees, row 2 fewer (the rest of its slots never written)
RING_SLOTS, SLIDING_WINDOW, RING_LENGTHS = 13, 11, [40, 12, 5]


def _sliding_ring(tensors, lengths):
    """Each (B, H, RING_SLOTS, d) tensor as a ring of rows of `lengths` tokens (token t in slot
    t % RING_SLOTS, NaN in slots never written), and the same tokens a query sees, in order:
    (rings, in order, tokens each row sees)."""
    seen = lengths.clamp(max=SLIDING_WINDOW)
    tokens = (lengths - seen)[:, None] + torch.arange(SLIDING_WINDOW, device=lengths.device)
    rings = [_with_garbage(x, lengths) for x in tensors]  # a row shorter than the ring never wrote its last slots
    in_order = [ring.gather(2, (tokens % RING_SLOTS)[:, None, :, None].expand(-1, ring.shape[1], -1, ring.shape[3]))
                for ring in rings]
    return rings, in_order, seen


def test_decode_over_a_sliding_ring():
    """Dense and pruned decode over rings with a sliding window (kernels and reference ops) equal
    the reference over the tokens the query sees, laid out in order."""
    lengths = torch.tensor(RING_LENGTHS, device=DEVICE)
    x = _to(_pruned_inputs(PLANS["mixed"], 2, 3, RING_SLOTS))
    (*k_groups, v), (*k_in_order, v_in_order), seen = _sliding_ring([*x["k_groups"], x["v"]], lengths)
    want = _pruned_reference({**x, "k_groups": k_in_order, "v": v_in_order}, seen)
    rings = {**x, "k_groups": k_groups, "v": v}
    _assert_fp32_close(_pruned_triton(rings, lengths=lengths, window=SLIDING_WINDOW, **FORCED_SPLIT), want)
    got = ops.pruned_attention(x["q"], k_groups, x["heads"], x["channels"], v, None, D**-0.5, False, lengths,
                               SLIDING_WINDOW)
    _assert_fp32_close(got, want)

    (k, v), (k_in_order, v_in_order), seen = _sliding_ring([torch.randn_like(v), torch.randn_like(v)], lengths)
    want = ops.attention(x["q"], k_in_order, v_in_order, None, D**-0.5, False, seen)
    _assert_fp32_close(triton_decode.dense_decode(x["q"], k, v, D**-0.5, lengths=lengths, window=SLIDING_WINDOW,
                                                  **FORCED_SPLIT), want)
    _assert_fp32_close(ops.attention(x["q"], k, v, None, D**-0.5, False, lengths, SLIDING_WINDOW), want)


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("plan", PLANS)
def test_pruned_decode_with_ragged_lengths(group_size, plan):
    x, lengths = _ragged_pruned_inputs(plan, group_size)
    _assert_fp32_close(_pruned_triton(x, lengths=lengths, **FORCED_SPLIT), _pruned_reference(x, lengths))


@pytest.mark.parametrize("plan", PLANS)
def test_one_wave_launch_steps_narrow_regions_in_longer_blocks(plan, monkeypatch):
    # every launch counts as one wave: width groups keeping few channels and uniform heads step
    # through 32-token blocks where the window steps through 16; one piece per region (two splits
    # for window and middle, one for pruned) so a piece holds several blocks, the last partial
    monkeypatch.setattr(triton_decode, "PROGRAMS_PER_SM", 1 << 20)
    assert [triton_decode._narrow_block(w, D, D, 16, growth=2) for w in (0, 5, 8, D)] == [32, 32, 16, 16]
    x, window_lengths, middle_lengths = _ragged_windowed_inputs(plan, 3)
    out = _windowed_triton(x, window_lengths=window_lengths, middle_lengths=middle_lengths, block_tokens=16, splits=2)
    _assert_fp32_close(out, _windowed_reference(x, window_lengths, middle_lengths))
    x, lengths = _ragged_pruned_inputs(plan, 3)
    out = _pruned_triton(x, lengths=lengths, block_tokens=16, splits=1)
    _assert_fp32_close(out, _pruned_reference(x, lengths))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_with_ragged_lengths(dtype):
    tol = TOLERANCE_16[dtype]
    x, window_lengths, middle_lengths = _ragged_windowed_inputs("mixed", 3, dtype)
    out = _windowed_triton(x, window_lengths=window_lengths, middle_lengths=middle_lengths, **FORCED_SPLIT)
    assert out.dtype == dtype
    expected = _windowed_reference(_to(x, torch.float32), window_lengths, middle_lengths)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)

    x, lengths = _ragged_pruned_inputs("mixed", 3, dtype)
    out = _pruned_triton(x, lengths=lengths, **FORCED_SPLIT)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _pruned_reference(_to(x, torch.float32), lengths), atol=tol, rtol=tol)


def test_lengths_through_the_cuda_face(monkeypatch):
    """The ops' CUDA kernels (registered on CPU for the test) send a decode call with lengths, int32
    here, to Triton, and a call of several query tokens to the reference."""
    from kvcompile.kernels import cuda_decode

    calls = []
    monkeypatch.setattr(triton_decode, "windowed_decode", _counted(triton_decode.windowed_decode, calls))
    monkeypatch.setattr(triton_decode, "pruned_decode", _counted(triton_decode.pruned_decode, calls))
    windowed, window_lengths, middle_lengths = _ragged_windowed_inputs("mixed", 2, lengths_dtype=torch.int32)
    pruned, lengths = _ragged_pruned_inputs("mixed", 2, lengths_dtype=torch.int32)
    with torch.library._scoped_library("kvcompile", "IMPL") as lib:
        if DEVICE == "cpu":
            lib.impl("windowed_attention", cuda_decode._windowed_attention_cuda, "CPU")
            lib.impl("pruned_attention", cuda_decode._pruned_attention_cuda, "CPU")
        windowed_out = _windowed_reference(windowed, window_lengths, middle_lengths)
        pruned_out = _pruned_reference(pruned, lengths)
        assert len(calls) == 2
        prefill = dict(pruned, q=pruned["q"].expand(-1, -1, 3, -1))  # 3 query tokens: the kernels' limit
        prefill_out = _pruned_reference(prefill, lengths)
        assert len(calls) == 2 and prefill_out.shape[2] == 3
    _assert_fp32_close(windowed_out, _windowed_reference(windowed, window_lengths, middle_lengths))
    _assert_fp32_close(pruned_out, _pruned_reference(pruned, lengths))


def test_dense_attention_with_lengths_runs_the_kernel_with_one_window():
    """`kvcompile::attention`'s CUDA face (registered on CPU for the test), for layers a plan leaves
    whole: ragged rows, garbage past each, against the reference op."""
    from kvcompile.kernels import cuda_decode
    from kvcompile.kernels.ops import attention_reference

    g = torch.Generator(device=DEVICE).manual_seed(3)
    q = torch.randn(3, 4, 1, D, generator=g, device=DEVICE)
    lengths = torch.tensor(PRUNED_LENGTHS, device=DEVICE)
    k, v = (_with_garbage(torch.randn(3, 2, 50, D, generator=g, device=DEVICE), lengths) for _ in range(2))
    expected = attention_reference(q, k, v, None, D**-0.5, False, lengths)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_decode, "dense_decode", _counted(triton_decode.dense_decode, calls))
        out = cuda_decode._attention_cuda(q, k, v, None, D**-0.5, False, lengths)
    assert len(calls) == 1
    _assert_fp32_close(out, expected)


def test_supported():
    q = torch.zeros(1, 4, 1, D, device=DEVICE)
    assert triton_decode.supported(q, None)
    assert not triton_decode.supported(q, torch.ones(1, 1, 1, 5, dtype=torch.bool, device=DEVICE))
    assert not triton_decode.supported(torch.zeros(1, 4, 2, D, device=DEVICE), None)  # prefill
    assert not triton_decode.supported(q.to(torch.int32), None)
    with pytest.raises(ValueError, match="one query token"):
        triton_decode.pruned_decode(torch.zeros(1, 4, 2, D), [], [], [], torch.zeros(1, 4, 5, D), 1.0)


STEPS_THROUGH_KERNELS = 9  # every interpreted kernel call costs ~1.5 s; 9 steps see two window flushes


def test_a_windowed_decode_through_the_kernels_matches_the_masked_model(monkeypatch):
    """The whole path: a transformed tiny Llama whose decode steps go through the op's CUDA face (on
    CPU registered for the test, the kernels under the interpreter) against the HF model with the
    middle channels masked."""
    from kvcompile.kernels import cuda_decode
    from tests import test_windows
    from tests.masked_reference import masked_reference_decode
    from tests.tiny_models import make_tiny_model

    calls = []
    monkeypatch.setattr(triton_decode, "windowed_decode", _counted(triton_decode.windowed_decode, calls))
    model = make_tiny_model("llama", num_layers=test_windows.LAYERS).to(DEVICE)
    tm = kvcompile.transform(model, test_windows.PLAN, cuda_graphs=False)  # a graph's replay calls no Python
    prompt = test_windows._prompt(2, 12).to(DEVICE)
    with torch.library._scoped_library("kvcompile", "IMPL") as lib:
        if DEVICE == "cpu":
            lib.impl("windowed_attention", cuda_decode._windowed_attention_cuda, "CPU")
        got, tokens, middles = test_windows._transformed_decode(tm, prompt, steps=STEPS_THROUGH_KERNELS)
    assert len(set(middles)) >= 3  # the window moved tokens to the middle twice while decoding
    want, _ = masked_reference_decode(model, prompt, test_windows.K_CHANNELS, next_tokens=tokens,
                                      steps=STEPS_THROUGH_KERNELS, windows=test_windows.WINDOWS)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    assert len(calls) == STEPS_THROUGH_KERNELS * len(test_windows.K_CHANNELS)  # every decode step, planned layer


def _counted(fn, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return counted


def test_write_tokens_writes_every_entry_in_one_launch():
    """`kvcompile::write_tokens`' Triton face against its reference: two width groups, an entry written
    whole (its channel rows a broadcast view) from a strided source, two new tokens per row at each
    row's own slots."""
    from kvcompile.kernels import triton_write

    g = torch.Generator().manual_seed(0)
    batch, heads, seq, capacity = 2, 4, 2, 10
    key = torch.randn(batch, heads, seq, D, generator=g)
    value = torch.randn(batch, heads, seq + 1, D, generator=g)[:, :, 1:]
    sources = [key, key, value]
    rows = [torch.tensor([0, 2]), torch.tensor([3]), torch.arange(heads)]
    channels = [torch.tensor([[0, 1, 2, 5], [3, 4, 8, 15]]), torch.tensor([[7, 9, 11]]), torch.arange(D)[None].expand(heads, D)]
    slots = [torch.tensor([[3, 4], [7, 8]])] * 2 + [torch.tensor([[0, 1], [5, 6]])]
    caches = [torch.zeros(batch, 2, capacity, 4), torch.zeros(batch, 1, capacity, 3), torch.zeros(batch, heads, capacity, D)]
    want = [cache.clone() for cache in caches]
    ops.write_tokens(want, sources, rows, channels, slots)  # the reference, on CPU
    on_device = lambda tensors: [t.to(DEVICE) for t in tensors]  # noqa: E731
    got = on_device(caches)
    triton_write.write_tokens(got, on_device(sources), on_device(rows), on_device(channels), on_device(slots))
    for g_, w in zip(got, want):
        assert torch.equal(g_.cpu(), w)
    assert want[0][1, 1, 8].tolist() == key[1, 2, 1, [3, 4, 8, 15]].tolist()  # row 1's second token, head 2
