"""The command line: argument errors, presets, report and JSON; the real demo end to end where the weights are."""

import json
import math
import runpy
import sys

import pytest

from kvcompile import cli, models
from kvcompile.models import INSTALL_COMMAND, ModelNotAvailable, default_model_available, load_default_model


def fake_report(config: dict) -> dict:
    return {
        "model": "tiny",
        "config": config,
        "plan": {
            "fingerprint": "0123456789ab",
            "meta": {"method": "static-qk", "calibration_tokens": config["calib_tokens"]},
            "kept_k_fraction": 0.5,
            "k_bytes_per_token": 128,
            "v_bytes_per_token": 256,
        },
        "dense": {"perplexity": 10.0, "k_bytes_per_token": 256.0, "v_bytes_per_token": 256.0},
        "kvcompile": {"perplexity": 12.5, "greedy_agreement": 0.75, "k_bytes_per_token": 128.0, "v_bytes_per_token": 256.0},
        "seconds": {"load": 1.0},
    }


@pytest.fixture
def demo_configs(monkeypatch):
    """Replaces the model-running part of the demo; records the configs it was asked to run."""
    configs = []

    def run_demo(config, *, progress=True):
        configs.append(config)
        return fake_report(config)

    monkeypatch.setattr(cli, "run_demo", run_demo)
    return configs


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "1"], "--sparsity: must be in [0, 1)"),
        (["--sparsity", "-0.1"], "--sparsity: must be in [0, 1)"),
        (["--align", "0"], "--align: must be a positive integer"),
        (["--sparsity", "half"], "--sparsity: must be in [0, 1), got half"),
        (["--windows", "two"], "--windows: must be a positive integer, got two"),
        (["--context", "64", "--score-last", "64"], "--score-last (64) must be smaller than --context (64)"),
        (["--quick", "--score-last", "200"], "--score-last (200) must be smaller than --context (128)"),
    ],
)
def test_bad_arguments_fail_before_any_work(demo_configs, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert demo_configs == []


def test_quick_preset_fills_only_unset_options(demo_configs):
    assert cli.main(["demo", "--quick", "--context", "64"]) == 0
    (config,) = demo_configs
    assert config == {**cli.QUICK_RUN, "context": 64, "sparsity": 0.5, "align": 16, "seed": 0, "quick": True}


def test_report_table_and_json(demo_configs, capsys, tmp_path):
    path = tmp_path / "demo.json"
    assert cli.main(["demo", "--sparsity", "0.25", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "perplexity (last 64 of 512 tokens)" in out and "12.500 (+25.0%)" in out
    assert "K bytes / token" in out and "kept K channels" in out
    assert json.loads(path.read_text()) == fake_report({**cli.FULL_RUN, "sparsity": 0.25, "align": 16, "seed": 0, "quick": False})


def test_missing_weights_name_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(models, "WEIGHTS_PACKAGE", "kvcompile_no_such_weights")
    assert not default_model_available()
    with pytest.raises(ModelNotAvailable, match=INSTALL_COMMAND):
        load_default_model()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--quick"])
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
    assert cli.main(["demo", "--quick", "--no-progress", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    dense, compressed, plan = report["dense"], report["kvcompile"], report["plan"]
    full = 30 * 3 * 64 * 4  # layers x KV heads x head_dim x float32
    assert dense["k_bytes_per_token"] == dense["v_bytes_per_token"] == full
    assert compressed["k_bytes_per_token"] == plan["k_bytes_per_token"] == full // 2
    assert compressed["v_bytes_per_token"] == plan["v_bytes_per_token"] == full
    assert plan["kept_k_fraction"] == 0.5 and plan["meta"]["method"] == "static-qk"
    assert 1 < dense["perplexity"] < 100 and math.isfinite(compressed["perplexity"])
    assert 0 <= compressed["greedy_agreement"] <= 1
    assert report["config"]["quick"] is True
    assert "perplexity" in capsys.readouterr().out
