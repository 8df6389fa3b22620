"""`kvcompile onnx-latency` on a tiny model: the dense baseline's in-place decode computes what the
model computes, every variant is timed at every context, and the byte-ideal ratio is the plan's
bytes; the milliseconds are a benchmark's, not a test's."""

import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kvcompile import Plan  # noqa: E402
from kvcompile.benchmarks import onnx_latency  # noqa: E402
from kvcompile.capture import CACHE_NAME, capture, dynamic_cache_holding  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

WINDOWED = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]},
                                sink=2, recent=4, buffer=3)


def test_dense_export_decodes_like_the_model_writing_its_cache_in_place(tmp_path):
    model = make_tiny_model("qwen2")
    shape = onnx_latency.ModelShape.from_config(model.config)
    variant = onnx_latency._Variant(capture(model), Plan.from_k_channels({}), shape, tmp_path, ort.SessionOptions())
    layers = onnx_latency.random_dense_cache(shape, 2, 6, torch.float32, torch.device("cpu"))
    cache = variant.cache(layers, capacity=9)
    tokens = torch.tensor([[5, 7], [9, 11]])
    values = {"input_ids": tokens, "position_ids": torch.tensor([[6, 7], [6, 7]]), **cache.prepare_call(2)}
    got = variant.call(values, cache.buffers)
    keys, values_ = [k for k, _ in layers], [v for _, v in layers]
    with torch.no_grad():
        out = model(tokens, use_cache=True, **{CACHE_NAME: dynamic_cache_holding(keys, values_)})
    torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
    for layer, held in enumerate(out.past_key_values.layers):  # the new tokens were written in place
        torch.testing.assert_close(cache.buffers[f"key.{layer}"][:, :, :8], held.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(cache.buffers[f"value.{layer}"][:, :, :8], held.values, atol=1e-5, rtol=0)


def test_every_variant_is_timed_at_every_context_against_its_byte_ideal():
    model = make_tiny_model("llama")
    report = onnx_latency.run(model, {"windowed": WINDOWED}, contexts=(32, 96), reps=2)
    assert set(report["ms_per_step"]) == {"dense", "windowed"}
    for name in ("dense", "windowed"):
        for c in (32, 96):
            times = report["ms_per_step"][name][c]
            assert 0 < times["min"] <= times["median"] <= times["max"]
            assert report["cpu_ms_per_step"][name][c] >= 0
    shape = onnx_latency.ModelShape.from_config(model.config)
    weights = sum(p.numel() * 4 for p in model.parameters())
    for c in (32, 96):
        dense, windowed = (plan.cache_nbytes(shape, torch.float32, 1, c) for plan in (Plan.from_k_channels({}), WINDOWED))
        assert report["cache_bytes"]["windowed"][c] == windowed and report["cache_bytes"]["dense"][c] == dense
        assert report["byte_ideal"]["windowed"][c] == pytest.approx((weights + dense) / (weights + windowed), abs=1e-3)
    assert report["dense_over_variant"]["dense"] == report["byte_ideal"]["dense"] == {32: 1.0, 96: 1.0}
    assert report["threads"] == 1 and set(report["load_average"]) == {"before", "after"}
    assert "context 96" in onnx_latency.format_table(report)
    with pytest.raises(ValueError, match="dense baseline"):
        onnx_latency.run(model, {"dense": WINDOWED})
