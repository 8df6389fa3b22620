"""`kvcompile throughput`'s runner on a tiny model (CPU): every method decodes from a cache of the
asked length; the numbers themselves are a benchmark's, not a test's."""

import pytest
import torch

import kvcompile
from kvcompile import Plan, PlanError
from kvcompile.benchmarks import throughput
from tests.tiny_models import make_tiny_model

WINDOWED = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]},
                                sink=4, recent=8, buffer=8)


# static-compiled (inductor, CUDA graphs) is left to the CUDA benchmark runs: compiling it here costs minutes
CPU_METHODS = ("dense", "dense-twin", "transformed", "compiled", "compiled-own-graphs")


def test_every_method_decodes_and_the_report_compares_with_dense():
    torch._dynamo.reset()
    so_far = []
    report = throughput.run(make_tiny_model("llama"), WINDOWED, batch=2, context=40, steps=2, warmup=3, repeats=2,
                            methods=CPU_METHODS, on_method=so_far.append)
    assert set(report["tokens_per_s"]) == set(CPU_METHODS)
    # after each method, the report of those measured so far (what `--json` keeps of an interrupted run)
    assert [list(partial["tokens_per_s"]) for partial in so_far] == [list(CPU_METHODS[: i + 1]) for i in range(len(CPU_METHODS))]
    assert so_far[-1] == report
    assert all(rate > 0 for rate in report["tokens_per_s"].values())
    assert all(low <= report["tokens_per_s"][m] <= high for m, (low, high) in report["tokens_per_s_min_max"].items())
    assert report["speedup_vs_dense"]["dense"] == 1.0 == report["speedup_vs_fastest_stock"]["dense"]
    # the twin reads the dense cache, the plan a smaller one; both read every weight
    assert report["bytes_per_step"]["dense-twin"] == report["bytes_per_step"]["dense"] > report["bytes_per_step"]["transformed"]
    assert report["bytes_per_step"]["compiled"] == report["bytes_per_step"]["transformed"]  # the same cache
    assert report["byte_ideal_speedup"] == round(report["bytes_per_step"]["dense"] / report["bytes_per_step"]["transformed"], 3)
    assert "batch 2 x context 40" in throughput.format_row(report)
    torch._dynamo.reset()


def test_a_healed_merge_decodes_too():
    """A plan whose cache is no function of the dense model's (merged heads, projection updates) gets
    its random cache in its own layout."""
    from tests.test_static_cache import PLANS

    torch._dynamo.reset()
    plan = PLANS["healed-windowed-merged-post-pruned"]("llama")
    report = throughput.run(make_tiny_model("llama"), plan, batch=2, context=40, steps=2, warmup=3, repeats=1,
                            methods=("dense", "transformed", "compiled"))
    assert not report["failed"] and set(report["tokens_per_s"]) == {"dense", "transformed", "compiled"}
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["windowed-merged-post-pruned", "merged-commute"])
def test_the_random_compressed_cache_has_a_prefills_layout(kind):
    from tests.test_static_cache import PLANS, _prompt

    model, plan = make_tiny_model("llama"), PLANS[kind]("llama")
    shape = throughput.ModelShape.from_config(model.config)
    prefilled = kvcompile.transform(model, plan, cuda_graphs=False)(_prompt(batch=2, length=40), max_cache_len=50)
    want = prefilled.past_key_values
    got = throughput.random_compressed_cache(plan, shape, 2, 40, 50, torch.float32, torch.device("cpu"))
    assert {name: t.shape for name, t in got.buffers.items()} == {name: t.shape for name, t in want.buffers.items()}
    assert got.row_lengths == want.row_lengths == [40, 40] and got.nbytes == want.nbytes


def test_plan_is_checked_against_the_model_first():
    with pytest.raises(PlanError, match="plan layer 5"):
        throughput.run(make_tiny_model("llama"), Plan.from_k_channels({5: [[0], [1]]}), batch=1, context=8)
    with pytest.raises(ValueError, match="unknown methods"):
        throughput.run(make_tiny_model("llama"), WINDOWED, batch=1, context=8, methods=("fast",))


def test_random_dense_cache_has_the_models_layout():
    model = make_tiny_model("qwen3", num_layers=3)
    shape = throughput.ModelShape.from_config(model.config)
    layers = throughput.random_dense_cache(shape, batch=2, context=5, dtype=torch.float16, device=torch.device("cpu"))
    assert len(layers) == 3
    assert all(k.shape == v.shape == (2, 2, 5, 16) and k.dtype == torch.float16 for k, v in layers)


def test_leank_mask_plan_keeps_the_published_counts():
    shape = throughput.ModelShape("llama", num_layers=2, num_kv_heads=8, num_heads=32, head_dim=128)
    plan = throughput.leank_mask_plan(shape)
    counts = throughput.json.loads(throughput.LEANK_COUNTS.read_text())["kept_channels_per_layer_per_kv_head"]
    assert [list(plan.kept_counts(layer)) for layer in range(2)] == counts[:2]
    plan.validate(shape)
    assert (plan.sink, plan.recent) == (128, 1024)
