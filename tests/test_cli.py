"""The command line: argument errors before any work, the eval flow on a tiny model, the real
quick demo end to end where the weights are."""

import json
import runpy
import sys

import pytest
import torch

import kvcompile
from kvcompile import Plan, cli, models
from kvcompile.evaluation import evaluate
from kvcompile.models import INSTALL_COMMAND, ModelNotAvailable, default_model_available, load_default_model
from tests.test_evaluate import model as tiny_model  # noqa: F401  (fixtures)
from tests.test_evaluate import tokenizer as byte_tokenizer  # noqa: F401


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as loading the model."""
    monkeypatch.setattr(cli, "load_default_model", lambda *args: pytest.fail("loaded the model"))


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--sparsity", "1"], "--sparsity: must be in [0, 1)"),
        (["demo", "--quick"], "unrecognized arguments: --quick"),
        (["demo", "--baseline-windows", "64"], "--baseline-windows: expected 2 arguments"),
        (["demo", "--baseline-windows", "64", "all"], "--baseline-windows: must be a non-negative integer, got all"),
        (["demo", "--table", "/"], "--table /: is a folder"),
        (["demo", "--plan", "smollm2-135m-instruct/leank-k50", "--plan", "NO_WINDOWS_PLAN"],
         "the plans have different windows (leank-k50 64 256, no-windows 0 0): pass --baseline-windows SINK RECENT"),
        (["demo", "--model", "MODEL_DIR"], "the demo's plans (smollm2-135m-instruct/leank-k50, "
         "smollm2-135m-instruct/leank-k70) are SmolLM2-135M-Instruct's; pass --plan for this model, or --full"),
        (["eval", "--full"], "unrecognized arguments: --full"),
        (["eval", "--sparsity", "half"], "--sparsity: must be in [0, 1), got half"),
        (["eval", "--align", "0"], "--align: must be a positive integer"),
        (["eval", "--lengths", "2K"], "--lengths: must be a positive integer, got 2K"),
        (["eval", "--tasks", "haystack"], "--tasks: invalid choice: 'haystack'"),
        (["eval", "--plan", "/no/such/plan"], "/no/such/plan: no such plan directory, nor a built-in plan"),
        (["calibrate", "out", "--k-method", "learned"], "--k-method: invalid choice"),
        (["calibrate", "out", "--rope", "pre"], "--rope: invalid choice"),
        (["calibrate", "out", "--k-sparsity", "0.5", "--heal-steps", "3", "--heal-rank", "0"],
         "--heal-rank 0: healing a plan that merges no heads"),
        (["heal", "/no/such/plan", "out"], "/no/such/plan: no such plan directory, nor a built-in plan"),
        (["heal", "smollm2-135m-instruct/leank-k50", "out", "--rank", "-1"], "--rank: must be"),
        (["calibrate", "out", "--kv-group-size", "2", "--heal-steps", "0"], "--heal-steps: must be a positive integer"),
        (["export", "/", "--plan", "smollm2-135m-instruct/leank-k50"], "OUTPUT /: a non-empty directory without manifest.json"),
    ],
)
def test_bad_arguments_fail_before_any_work(no_model, capsys, tmp_path, argv, message):
    Plan.load_builtin("smollm2-135m-instruct/leank-k50").with_windows(0, 0).save(tmp_path / "no-windows")
    (tmp_path / "model").mkdir()
    argv = [{"NO_WINDOWS_PLAN": str(tmp_path / "no-windows"), "MODEL_DIR": str(tmp_path / "model")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_rows_table_json_and_plot(monkeypatch, tiny_model, byte_tokenizer, capsys, tmp_path):  # noqa: F811
    monkeypatch.setattr(cli, "load_default_model", lambda *args: (tiny_model, byte_tokenizer))
    argv = ["eval", "--quick", "--lengths", "1024", "--tasks", "passkey", "--sparsity", "0.5", "--align", "4", "--calib-tokens", "512",
            "--no-progress", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["dense", "random-k50%", "static-k50%"]
    assert report["plans"]["static-k50%"]["meta"]["method"] == "static-qk"
    assert report["settings"]["lengths"] == [1024] and report["settings"]["tasks"] == ["passkey"]
    assert "static-k50%" in capsys.readouterr().out
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_a_merge_and_heal_it(monkeypatch, tiny_model, byte_tokenizer, tmp_path):  # noqa: F811
    monkeypatch.setattr(cli, "load_default_model", lambda *args: (tiny_model, byte_tokenizer))
    plan_dir = tmp_path / "healed"
    assert cli.main(["calibrate", str(plan_dir), "--kv-group-size", "2", "--calib-tokens", "512", "--heal-steps", "2",
                     "--heal-lr", "0.01", "--heal-seed", "3", "--device", "cpu", "--no-progress"]) == 0
    plan = Plan.load(plan_dir)
    assert {k: plan.meta["heal"][k] for k in ("steps", "lr", "seed")} == {"steps": 2, "lr": 0.01, "seed": 3}
    assert (plan_dir / "checkpoint" / "heal" / "state.json").is_file()


def test_heal_a_saved_k_channel_plan(monkeypatch, tiny_model, byte_tokenizer, capsys, tmp_path):  # noqa: F811
    monkeypatch.setattr(cli, "load_default_model", lambda *args: (tiny_model, byte_tokenizer))
    assert cli.main(["calibrate", str(tmp_path / "pruned"), "--k-sparsity", "0.5", "--align", "4", "--calib-tokens", "512",
                     "--device", "cpu", "--no-progress"]) == 0
    assert cli.main(["heal", str(tmp_path / "pruned"), str(tmp_path / "healed"), "--steps", "2", "--rank", "4",
                     "--batch-size", "2", "--chunk-tokens", "384", "--tasks", "passkey", "--task-share", "0.5",
                     "--projections", "value", "output", "--decode", "steps", "--device", "cpu", "--no-progress"]) == 0
    pruned, healed = Plan.load(tmp_path / "pruned"), Plan.load(tmp_path / "healed")
    assert healed.k_channels == pruned.k_channels and sorted(healed.updates) == sorted(pruned.k_channels)
    record = healed.meta["heal"]
    assert (record["rank"], record["batch_size"], record["chunk_tokens"]) == (4, 2, 384)
    assert (record["tasks"], record["task_share"], record["projections"], record["decode"]) == (
        ["passkey"], 0.5, ["value", "output"], "steps")
    assert all(sorted(update.factors) == ["output", "value"] for update in healed.updates.values())
    assert "healed (2 steps, 50% retrieval prompts (passkey), updates of value output, decoded in steps, KL" in cli._describe(healed)
    assert f"healed from {pruned.fingerprint()}" in capsys.readouterr().err
    assert (tmp_path / "healed" / "checkpoint" / "state.json").is_file()


def test_leank_calibrate_then_eval_with_and_without_windows_then_importance(
        monkeypatch, tiny_model, byte_tokenizer, capsys, tmp_path):  # noqa: F811
    monkeypatch.setattr(cli, "load_default_model", lambda *args: (tiny_model, byte_tokenizer))
    plan_dir = tmp_path / "learned"
    assert cli.main(["calibrate", str(plan_dir), "--k-sparsity", "0.5", "--k-method", "leank", "--align", "4",
                     "--sink", "4", "--recent", "8", "--stage1-steps", "2", "--stage2-steps", "2",
                     "--train-lengths", "384", "--train-tasks", "passkey", "--device", "cpu", "--no-progress"]) == 0
    plan = Plan.load(plan_dir)
    assert plan.meta["method"] == "leank" and (plan.sink, plan.recent) == (4, 8)
    assert (plan_dir / "checkpoint" / "state.json").is_file()

    argv = ["eval", "--quick", "--lengths", "1024", "--tasks", "passkey", "--plan", str(plan_dir), "--windows", "4", "8",
            "--no-progress", "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    rows = {row["name"]: row for row in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert list(rows) == ["dense", "plan:learned", "plan:learned+w4/8"]
    for row in rows.values():  # bytes held match the plan's count at the measured length, windows or not
        if row["k_bytes_per_token_formula"] is not None:
            assert row["k_bytes_per_token"] == pytest.approx(row["k_bytes_per_token_formula"])
            assert row["v_bytes_per_token"] == pytest.approx(row["v_bytes_per_token_formula"])
    assert rows["plan:learned+w4/8"]["k_bytes_per_token"] > rows["plan:learned"]["k_bytes_per_token"]

    pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert cli.main(["importance", str(plan_dir), "--png", str(tmp_path / "i.png")]) == 0
    assert capsys.readouterr().out.startswith("layer")
    assert (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"


def test_builtin_plans_are_listed_and_load_by_name(no_model, capsys):
    assert cli.main(["plans"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct/leank-k70  leank, 70% K sparsity, windows 64/256\n" in out
    assert "smollm2-135m-instruct/commute-3to2-healed  commute merge of KV heads 3 -> 2 in 30 layers, healed (300 steps" in out
    assert cli.main(["importance", "smollm2-135m-instruct/leank-k50"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 30


def test_missing_weights_name_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(models, "WEIGHTS_PACKAGE", "kvcompile_no_such_weights")
    assert not default_model_available()
    with pytest.raises(ModelNotAvailable, match=INSTALL_COMMAND):
        load_default_model()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--quick"])
    assert exit_info.value.code == 1
    assert INSTALL_COMMAND in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kvcompile", "demo", "--sparsity", "2"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("kvcompile", run_name="__main__")
    assert exit_info.value.code == 2
    assert "--sparsity: must be in [0, 1)" in capsys.readouterr().err


class _Stop(Exception):
    pass


@pytest.mark.parametrize("argv, plans, baselines, windows, lengths, tasks", [
    (["demo"], ["leank-k50", "leank-k70"], ["static"], (64, 256), (2048,), ()),
    (["demo", "--full"], [], ["static", "random"], (0, 0), (1024, 2048, 4096), evaluate.tasks.TASKS),
    (["demo", "--baseline-windows", "0", "128", "--tasks", "passkey"], ["leank-k50", "leank-k70"], ["static"], (0, 128),
     (2048,), ("passkey",)),
    (["eval", "--sparsity", "0.5"], [], ["static", "random"], (0, 0), (1024, 2048, 4096), evaluate.tasks.TASKS),
])
def test_demo_runs_the_shipped_plans_and_full_the_old_rows(monkeypatch, tiny_model, byte_tokenizer, argv, plans,  # noqa: F811
                                                           baselines, windows, lengths, tasks):
    """The default demo: the shipped learned plans, the static ranking at 50% and 70% with their
    windows, perplexity and agreement at 2K; `--full`: the static and random baselines without
    windows, retrieval and perplexity at 1K-4K (what the demo was)."""
    asked = {}

    def methods(model, tokenizer, **kwargs):
        asked.update(kwargs)
        return [evaluate.Method("dense")]

    def stop(model, tokenizer, methods, settings, **kwargs):
        asked["settings"] = settings
        raise _Stop

    monkeypatch.setattr(cli, "load_default_model", lambda *args: (tiny_model, byte_tokenizer))
    monkeypatch.setattr(cli, "evaluation_methods", methods)
    monkeypatch.setattr(cli.evaluate, "evaluate", stop)
    with pytest.raises(_Stop):
        cli.main(argv + ["--no-progress", "--device", "cpu"])
    assert [name for name, _ in asked["plans"]] == plans
    assert asked["baselines"] == baselines and asked["baseline_windows"] == windows
    assert asked["sparsities"] == ([0.5] if argv[0] == "eval" else [0.5, 0.7]) and asked["calib_tokens"] == 8192
    assert asked["settings"].lengths == lengths and asked["settings"].tasks == tasks


def test_demo_writes_each_row_as_it_goes(monkeypatch, tiny_model, byte_tokenizer, tmp_path):  # noqa: F811
    """Interrupted in its third row, the demo leaves the JSON, table and plot of the first two."""
    from kvcompile.evaluation import evaluate as evaluation

    monkeypatch.setattr(cli, "load_default_model", lambda *args: (tiny_model, byte_tokenizer))
    plan_dir = tmp_path / "learned"
    Plan.from_k_channels({layer: [[0, 1, 2, 3], [4, 5, 6, 7]] for layer in range(2)}, sink=4, recent=8).save(plan_dir)
    real = evaluation._perplexity_and_agreement

    def stop_at_the_plan(runner, row, *args):
        if row.name == "plan:learned":
            raise KeyboardInterrupt
        return real(runner, row, *args)

    monkeypatch.setattr(evaluation, "_perplexity_and_agreement", stop_at_the_plan)
    out = {option: tmp_path / f"demo.{suffix}" for option, suffix in (("json", "json"), ("table", "txt"), ("plot", "png"))}
    argv = ["demo", "--plan", str(plan_dir), "--sparsity", "0.5", "--align", "4", "--calib-tokens", "512",
            "--lengths", "256", "--ppl-windows", "1", "--no-progress", "--device", "cpu"]
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + [item for option, path in out.items() for item in (f"--{option}", str(path))])
    report = json.loads(out["json"].read_text())
    assert report["partial"] and [row["name"] for row in report["rows"]] == ["dense", "static-k50%+w4/8"]
    assert list(report["plans"]) == ["dense", "static-k50%+w4/8", "plan:learned"]
    assert [line.split()[0] for line in out["table"].read_text().splitlines()[1:3]] == ["dense", "static-k50%+w4/8"]
    assert out["plot"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo.json", "demo.png", "demo.txt", "learned"]


def test_cpu_threads_one_fewer_than_cores_while_running_unless_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    with cli._cpu_threads("cpu"):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with cli._cpu_threads("cpu"):
        assert torch.get_num_threads() == before


@pytest.mark.real_model
def test_demo_end_to_end(tmp_path, capsys):
    """`kvcompile demo` as it ships: the learned plans against the static ranking with the same
    windows, on SmolLM2-135M-Instruct at 2K."""
    if not default_model_available():
        pytest.skip(f"SmolLM2 weights not installed ({INSTALL_COMMAND})")
    out = {option: tmp_path / f"demo.{suffix}" for option, suffix in (("json", "json"), ("table", "txt"), ("plot", "png"))}
    assert cli.main(["demo", "--no-progress"] + [item for option, path in out.items()
                                                 for item in (f"--{option}", str(path))]) == 0
    report = json.loads(out["json"].read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["dense", "static-k50%+w64/256", "static-k70%+w64/256", "plan:leank-k50", "plan:leank-k70"]
    assert "partial" not in report and report["settings"]["lengths"] == [2048] and report["settings"]["tasks"] == []
    full = 30 * 3 * 64 * 4  # layers x KV heads x head_dim x float32
    assert rows["dense"]["k_bytes_per_token"] == rows["dense"]["v_bytes_per_token"] == full
    for row in rows.values():  # what the cache holds is what the plan says, windows included
        if row["k_bytes_per_token_formula"] is not None:
            assert row["k_bytes_per_token"] == pytest.approx(row["k_bytes_per_token_formula"])
            assert row["v_bytes_per_token"] == pytest.approx(row["v_bytes_per_token_formula"])
    # same sparsity, same windows: the static ranking holds the learned plan's K bytes
    assert rows["static-k50%+w64/256"]["k_bytes_per_token"] == rows["plan:leank-k50"]["k_bytes_per_token"] < full
    assert rows["static-k70%+w64/256"]["k_bytes_per_token"] == rows["plan:leank-k70"]["k_bytes_per_token"]
    assert 1 < rows["dense"]["perplexity"]["2048"] < 20 and rows["dense"]["agreement"]["2048"] == 1
    assert all(rows[name]["perplexity"]["2048"] < 2 * rows["dense"]["perplexity"]["2048"] for name in rows)
    assert "plan:leank-k70" in capsys.readouterr().out and "plan:leank-k70" in out["table"].read_text()
    assert out["plot"].read_bytes()[:4] == b"\x89PNG"


def test_your_own_model_directory_runs_through_eval(no_model, tiny_model, byte_tokenizer, capsys, tmp_path):  # noqa: F811
    """`--model DIR`: a transformers model saved with its tokenizer, loaded from local files (the
    embedded model is never touched), in the `--dtype` asked for."""
    folder = tmp_path / "my-model"
    tiny_model.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    argv = ["eval", "--model", str(folder), "--quick", "--lengths", "1024", "--tasks", "passkey", "--sparsity", "0.5",
            "--align", "4", "--calib-tokens", "512", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["dense", "random-k50%", "static-k50%"]
    assert report["model"] == str(folder)
    model, _ = models.load_model(folder, torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.max_position_embeddings == 2048


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "/no/such/model"], "--model /no/such/model: no such directory or file"),
        (["calibrate", "out", "--model", "MODEL_DIR", "--k-sparsity", "0.5"], "not a transformers model directory"),
        (["eval", "--model", "MODEL_DIR_WITH_CONFIG", "--lengths", "4096"], "--lengths 4096: longer than the model's context (2048 tokens)"),
    ],
)
def test_a_bad_model_path_fails_before_any_work(no_model, tiny_model, capsys, tmp_path, argv, message):  # noqa: F811
    (tmp_path / "empty").mkdir()
    tiny_model.config.save_pretrained(tmp_path / "config-only")
    argv = [{"MODEL_DIR": str(tmp_path / "empty"), "MODEL_DIR_WITH_CONFIG": str(tmp_path / "config-only")}.get(a, a)
            for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code in (1, 2)
    assert message in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvcompile {kvcompile.__version__}"


def test_reprs_are_short_and_a_transformed_model_refuses_conversion():
    """`repr(plan)` and `repr(tm)` were 14K and 27K characters; `tm.to(dtype)` converted the user's
    own parameters (shared with the programs) and left the transformed model behind."""
    from tests.test_runtime import PRUNE
    from tests.tiny_models import make_tiny_model

    plan = Plan.load_builtin("smollm2-135m-instruct/leank-k50")
    assert len(repr(plan)) < 200 and plan.fingerprint() in repr(plan)
    model = make_tiny_model("llama")
    tm = kvcompile.transform(model, PRUNE)
    assert len(repr(tm)) < 300
    with pytest.raises(RuntimeError, match="convert the model .* and call kvcompile.transform on it again"):
        tm.to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched
