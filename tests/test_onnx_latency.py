"""`kvcompile onnx-latency` on a tiny model: the dense baseline is the model's own decode, every
variant is timed at every context; the milliseconds are a benchmark's, not a test's."""

import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kvcompile import Plan  # noqa: E402
from kvcompile.benchmarks import onnx_latency  # noqa: E402
from kvcompile.capture import capture, dynamic_cache_holding  # noqa: E402
from kvcompile.program import past, signature_of  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

PRUNE = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]})


def test_dense_export_decodes_like_the_model(tmp_path):
    model = make_tiny_model("qwen2")
    shape = onnx_latency.ModelShape.from_config(model.config)
    layers = onnx_latency.random_dense_cache(shape, 2, 6, torch.float32, torch.device("cpu"))
    keys, values = [k for k, _ in layers], [v for _, v in layers]
    program, encode = onnx_latency._dense_decode(capture(model))
    pasts = encode(keys, values)
    session = ort.InferenceSession(str(onnx_latency._export_decode(program, pasts, tmp_path / "dense.onnx")))
    tokens = torch.tensor([[5, 7], [9, 11]])
    feeds = {"input_ids": tokens.numpy(), "position_ids": torch.tensor([[6, 7], [6, 7]]).numpy()}
    feeds.update({past(entry): pasts[entry].numpy() for entry in signature_of(program).cache_inputs})
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = model(tokens, past_key_values=dynamic_cache_holding(keys, values), use_cache=True).logits
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)


def test_every_variant_is_timed_at_every_context():
    report = onnx_latency.run(make_tiny_model("llama"), {"k50": PRUNE}, contexts=(32, 96), reps=2)
    assert set(report["ms_per_step"]) == {"dense", "k50"}
    assert all(report["ms_per_step"][name][c] > 0 for name in ("dense", "k50") for c in (32, 96))
    assert report["dense_over_variant"]["dense"] == {32: 1.0, 96: 1.0}
    assert "context 96" in onnx_latency.format_table(report)
    with pytest.raises(ValueError, match="dense baseline"):
        onnx_latency.run(make_tiny_model("llama"), {"dense": PRUNE})
