"""The evaluation harness on a tiny random model with a byte-level tokenizer: every number checked
against a plain computation, the dense row against the dense model run directly."""

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcompile import Plan
from kvcompile.evaluation.evaluate import (QUICK, EvalSettings, Method, evaluate, figure, format_table, kv_bytes_per_token,
                                          length_label, paired_comparison, plot, wilson_interval)
from tests import dense_scores
from tests.tiny_models import byte_level_tokenizer

SETTINGS = EvalSettings(lengths=(1024,), tasks=("passkey", "multikey"), samples=2, ppl_windows=2, score_last=6,
                        agreement_tokens=4)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer(eos_token="\u0100")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # the weights, and so how far one channel moves them, must not depend on test order
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _plan(per_head):
    return Plan.from_k_channels({layer: per_head for layer in range(2)})


@pytest.fixture(scope="module")
def report(model, tokenizer):
    methods = [
        Method("dense"),
        Method("all-channels", _plan([list(range(16))] * 2)),
        Method("one-channel", _plan([[0], [15]])),
    ]
    return evaluate(model, tokenizer, methods, SETTINGS, progress=False)


def _row(report, name):
    return next(row for row in report["rows"] if row["name"] == name)


def test_dense_perplexity_is_the_models_own(model, tokenizer, report):
    assert _row(report, "dense")["perplexity"]["1024"] == pytest.approx(
        dense_scores.perplexity(model, tokenizer, SETTINGS, 1024), rel=1e-4)


def test_dense_retrieval_row_is_what_the_dense_model_generates(model, tokenizer, report):
    for task in SETTINGS.tasks:
        hits = dense_scores.retrieval_hits(model, tokenizer, SETTINGS, task, 1024)
        assert _row(report, "dense")["accuracy"][f"{task}@1024"]["correct"] == hits


def test_a_plan_keeping_everything_scores_like_dense(report):
    dense, same = _row(report, "dense"), _row(report, "all-channels")
    assert same["perplexity"]["1024"] == pytest.approx(dense["perplexity"]["1024"], rel=1e-4)
    assert same["agreement"]["1024"] == 1.0 and dense["agreement"]["1024"] == 1.0
    assert same["accuracy"] == dense["accuracy"]


def test_pruning_moves_the_numbers_and_the_bytes(report):
    dense, pruned = _row(report, "dense"), _row(report, "one-channel")
    assert abs(pruned["perplexity"]["1024"] / dense["perplexity"]["1024"] - 1) > 1e-2
    assert pruned["agreement"]["1024"] < 1.0
    assert dense["k_bytes_per_token"] == 2 * 2 * 16 * 4
    assert pruned["k_bytes_per_token"] == pruned["k_bytes_per_token_formula"] == 2 * 2 * 1 * 4
    assert pruned["v_bytes_per_token"] == pruned["v_bytes_per_token_formula"] == dense["v_bytes_per_token"]


def test_identical_inputs_give_identical_numbers(model, tokenizer, report):
    again = evaluate(model, tokenizer, [Method("dense"), Method("all-channels", _plan([list(range(16))] * 2)),
                                        Method("one-channel", _plan([[0], [15]]))], SETTINGS, progress=False)
    assert again["rows"] == report["rows"]


def test_table_json_and_plot(report, tmp_path):
    table = format_table(report)
    assert table.splitlines()[0].split()[:3] == ["method", "passkey@1K", "multikey@1K"]
    assert "one-channel" in table and "95% Wilson interval" in table
    plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_the_figure_has_a_legend_a_perplexity_panel_and_intervals(report):
    pytest.importorskip("matplotlib")
    fig = figure(report)
    accuracy_axes, perplexity_axes = fig.axes
    names = [row["name"] for row in report["rows"]]
    assert [text.get_text() for text in fig.legends[0].get_texts()] == names  # one entry per method
    longest = max(report["rows"][0]["perplexity"], key=int)
    assert perplexity_axes.get_ylabel() == f"perplexity at {length_label(longest)} tokens"
    assert [line.get_ydata()[0] for line in perplexity_axes.get_lines()] == [row["perplexity"][longest] for row in report["rows"]]
    intervals = accuracy_axes.containers  # one errorbar per method, its bar the Wilson interval
    assert len(intervals) == len(names)
    row = report["rows"][0]
    cells = list(row["accuracy"].values())
    low, high = wilson_interval(sum(c["correct"] for c in cells), sum(c["samples"] for c in cells))
    (bar,) = intervals[0].lines[2]
    assert bar.get_segments()[0][:, 1].tolist() == pytest.approx([low, high])
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_merged_plans_prefill_themselves(model, tokenizer):
    from kvcompile import Recipe, calibrate

    merged = calibrate(model, Recipe(kv_group_size=2), torch.randint(0, 256, (2, 32)), progress=False)
    report = evaluate(model, tokenizer, [Method("dense"), Method("merged", merged)],
                      EvalSettings(lengths=(512,), tasks=("passkey",), samples=1, ppl_windows=1, score_last=4,
                                   agreement_tokens=2), progress=False)
    assert _row(report, "merged")["k_bytes_per_token"] == _row(report, "dense")["k_bytes_per_token"] / 2


def test_wilson_interval():
    assert wilson_interval(0, 4)[0] == 0 and 0.4 < wilson_interval(0, 4)[1] < 0.5
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high) and 0.2 < low < 0.3


def test_quick_setting_is_short():
    assert QUICK.lengths == (512,) and QUICK.samples * len(QUICK.tasks) <= 4


def test_bytes_of_a_transformers_cache(model):
    with torch.no_grad():
        cache = model(torch.randint(0, 256, (2, 10)), use_cache=True).past_key_values
    assert kv_bytes_per_token(cache) == (2 * 2 * 16 * 4, 2 * 2 * 16 * 4)


def test_the_static_ranking_is_measured_once_for_every_sparsity(model, tokenizer, monkeypatch):
    """`static_k_plans` gives, from one pass over the calibration text, the plans `calibrate` gives
    one sparsity at a time; the evaluation's static rows come from that one pass."""
    from kvcompile.calibration import calibrate as calibration
    from kvcompile.calibration.recipe import Recipe
    from kvcompile.evaluation.methods import evaluation_methods
    from kvcompile.evaluation.text import calibration_text

    recipe = Recipe(align=4, calib_tokens=512, sink=4, recent=8)
    one_at_a_time = [calibration.calibrate(model, replace(recipe, k_sparsity=sparsity), [calibration_text()],
                                           tokenizer=tokenizer, progress=False) for sparsity in (0.5, 0.75)]
    passes = []
    record = calibration._record
    monkeypatch.setattr(calibration, "_record", lambda *args: passes.append(args) or record(*args))
    together = calibration.static_k_plans(model, recipe, [0.5, 0.75], [calibration_text()], tokenizer=tokenizer,
                                          progress=False)
    assert len(passes) == 1
    assert [plan.fingerprint() for plan in together] == [plan.fingerprint() for plan in one_at_a_time]
    assert [plan.meta for plan in together] == [plan.meta for plan in one_at_a_time]
    assert [plan.kept_counts(0) for plan in together] == [(8, 8), (4, 4)]

    passes.clear()
    methods = evaluation_methods(model, tokenizer, sparsities=[0.5, 0.75], baselines=["static"], align=4, calib_tokens=512,
                                 baseline_windows=(4, 8), progress=False)
    assert len(passes) == 1
    assert [method.name for method in methods] == ["dense", "static-k50%+w4/8", "static-k75%+w4/8"]
    assert [method.plan.fingerprint() for method in methods[1:]] == [plan.fingerprint() for plan in one_at_a_time]


def test_each_row_is_reported_when_it_is_finished(model, tokenizer):
    """Rows run one after another at each length; after each (but the last) the report so far goes
    to `on_method`, and a row's numbers never change once reported."""
    settings = EvalSettings(lengths=(256, 512), tasks=(), ppl_windows=1, score_last=2, agreement_tokens=2)
    methods = [Method("dense"), Method("one-channel", _plan([[0], [15]])), Method("all-channels", _plan([list(range(16))] * 2))]
    partial = []
    final = evaluate(model, tokenizer, methods, settings, progress=False, on_method=partial.append)
    assert [[row["name"] for row in report["rows"]] for report in partial] == [
        ["dense"], ["dense", "one-channel"], ["dense", "one-channel", "all-channels"],
        ["dense", "one-channel", "all-channels"], ["dense", "one-channel", "all-channels"]]
    assert all(report["partial"] for report in partial) and "partial" not in final
    for report in partial:
        for row, final_row in zip(report["rows"], final["rows"]):
            assert row["perplexity"] == {n: final_row["perplexity"][n] for n in row["perplexity"]}
    # in the second length, rows after the first lack it until measured: "-" in the table
    table = format_table(partial[3]).splitlines()
    assert table[0].split()[:3] == ["method", "ppl@256", "ppl@512"]
    assert table[2].split()[2] == "-" and table[1].split()[2] != "-"
    assert "retrieval" not in table[-1]


def test_without_retrieval_the_figure_shows_agreement(model, tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    report = evaluate(model, tokenizer, [Method("dense"), Method("one-channel", _plan([[0], [15]]))],
                      EvalSettings(lengths=(256,), tasks=(), ppl_windows=1, score_last=2, agreement_tokens=2),
                      progress=False)
    fig = figure(report)
    agreement_axes, _ = fig.axes
    assert agreement_axes.get_ylabel() == "greedy agreement with dense at 256 tokens"
    assert [line.get_ydata()[0] for line in agreement_axes.get_lines()] == [row["agreement"]["256"] for row in report["rows"]]
    import matplotlib.pyplot as plt

    plt.close(fig)
    plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert [path.name for path in tmp_path.iterdir()] == ["plot.png"]  # written through a temporary file, renamed


def test_each_prompt_s_outcome_is_kept_and_paired_against_the_first_row(report):
    dense, pruned = _row(report, "dense"), _row(report, "one-channel")
    for key, cell in pruned["accuracy"].items():
        assert len(cell["outcomes"]) == cell["samples"] and sum(cell["outcomes"]) == cell["correct"]
        only_dense, only_pruned, p_value = paired_comparison(dense["accuracy"][key]["outcomes"], cell["outcomes"])
        assert only_dense - only_pruned == dense["accuracy"][key]["correct"] - cell["correct"]
        assert f"-{only_dense}/+{only_pruned} p={p_value:.2f}" in format_table(report)


@pytest.mark.parametrize("baseline, other, want", [
    ([1] * 5 + [0] * 1 + [1] * 4, [0] * 5 + [1] * 1 + [1] * 4, (5, 1, 14 / 64)),  # 2 * (C(6,0) + C(6,1)) / 2^6
    ([1] * 10, [0] * 10, (10, 0, 2 / 1024)),
    ([1, 0, 1], [1, 0, 1], (0, 0, 1.0)),  # no discordant prompt: no evidence either way
    ([1, 0, 1, 0], [0, 1, 0, 1], (2, 2, 1.0)),
])
def test_paired_comparison_is_mcnemar_s_exact_test(baseline, other, want):
    assert paired_comparison(baseline, other) == pytest.approx(want)
    only_baseline, only_other, p_value = want
    assert paired_comparison(other, baseline) == pytest.approx((only_other, only_baseline, p_value))
    with pytest.raises(ValueError, match="same prompts: 3 against 2"):
        paired_comparison([1, 0, 1], [1, 0])

