"""Inputs a new user gets wrong, each refused clearly before any work or handled correctly.

Cases from a red-team pass over the runtime's entry points (issue "nothing lost, nothing silently
wrong"); each test names the case it reproduces.
"""

import hashlib
import json
import os
import re
import shutil

import pytest
import torch

import kvcompile
from kvcompile import Plan, PlanError
from tests.test_runtime import PRUNE, _prompt
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tm():
    return kvcompile.transform(make_tiny_model("llama"), PRUNE)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_input_ids_are_refused_by_shape(tm, shape):
    with pytest.raises(ValueError, match=re.escape(f"input_ids must be (batch, seq) with batch, seq >= 1, got shape {shape}")):
        tm(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("settings", [{"top_k": -1}, {"temperature": 0.0}])
def test_bad_sampling_settings_fail_before_the_prefill(tm, monkeypatch, settings):
    """transformers' generate checks them: a bad setting fails at once, not after the prompt's work."""
    def no_prefill(*args, **kwargs):
        raise AssertionError("the prompt was run before the settings were checked")

    monkeypatch.setattr(tm, "forward", no_prefill)
    with pytest.raises(ValueError, match=next(iter(settings))):
        tm.generate(_prompt(1), max_new_tokens=3, do_sample=True, **settings)


def test_a_model_without_weights_is_refused_at_transform():
    """A meta-device model (built without weights) fails at transform with the reason, not later."""
    model = make_tiny_model("llama").to("meta")
    with pytest.raises(ValueError, match="meta device"):
        kvcompile.transform(model, PRUNE)


def test_a_model_converted_after_transform_is_refused_by_name():
    """`model.half()` after transform: the programs share its parameters, so the next call says what
    changed and what to do instead of failing inside a matmul on mixed dtypes."""
    model = make_tiny_model("llama")
    tm = kvcompile.transform(model, PRUNE)
    model.half()
    with pytest.raises(RuntimeError, match=r"transformed in torch.float32 on cpu and is now in torch.float16 on cpu"):
        tm(_prompt(1))
    model.float()
    assert tm(_prompt(1)).logits.dtype == torch.float32  # converted back, it runs again


# -- plans on disk: atomic saves, integrity, malformed files ------------------------------------------

WINDOWED = PRUNE.with_windows(sink=2, recent=4)


def test_a_save_interrupted_between_its_files_over_another_plan_is_refused(tmp_path, monkeypatch):
    """Plan B saved over plan A, stopped after the tensors and before plan.json: the folder loads as
    neither (no mix of B's channels with A's windows); it says which file does not match."""
    from kvcompile import plan as plan_module

    WINDOWED.save(tmp_path)
    other = Plan.from_k_channels({0: [[1, 2], [3]], 1: [[4], [5, 6, 7]]})

    def interrupted(path, document):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_module, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        other.save(tmp_path)
    monkeypatch.undo()
    with pytest.raises(PlanError, match=r"tensors.safetensors: its content is not the one recorded beside it"):
        Plan.load(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    other.save(tmp_path)  # a finished save over the pair is whole again
    assert Plan.load(tmp_path).k_channels == other.k_channels


def _edit_json(folder, edit):
    path = folder / "plan.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def test_a_layer_deleted_from_plan_json_is_refused(tmp_path):
    """It would silently run that layer dense; the fingerprint saved with the plan catches it."""
    PRUNE.save(tmp_path)
    _edit_json(tmp_path, lambda document: document["k_channels"].pop("1"))
    with pytest.raises(PlanError, match=r"plan.json: the plan it describes is not the one saved .*it was edited"):
        Plan.load(tmp_path)


def test_edited_or_non_finite_tensors_are_refused(tmp_path):
    """Edited channel ids and NaN, scaled or reordered merge tensors change the tensors file's digest."""
    from safetensors.torch import load_file, save_file

    merged = _merged_plan()
    for name, change in [("k_channels.0", lambda t: t.flip(0)), ("merges.0.key_down", lambda t: t * float("nan")),
                         ("merges.0.value_up", lambda t: t * 2), ("merges.0.key_up", lambda t: t.flip(1))]:
        folder = tmp_path / name
        (merged if name.startswith("merges") else PRUNE).save(folder)
        tensors = load_file(folder / "tensors.safetensors")
        tensors[name] = change(tensors[name])
        save_file(tensors, folder / "tensors.safetensors")
        with pytest.raises(PlanError, match="SHA-256 mismatch"):
            Plan.load(folder)
    # with the digest updated too, the plan's fingerprint still tells
    folder = tmp_path / "redigested"
    merged.save(folder)
    tensors = load_file(folder / "tensors.safetensors")
    tensors["merges.0.value_up"] = tensors["merges.0.value_up"] * 2
    save_file(tensors, folder / "tensors.safetensors")
    digest = hashlib.sha256((folder / "tensors.safetensors").read_bytes()).hexdigest()
    _edit_json(folder, lambda document: document.update(tensors_sha256=digest))
    with pytest.raises(PlanError, match="it was edited"):
        Plan.load(folder)


def _merged_plan():
    from kvcompile.calibration.recipe import Recipe

    chunks = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return kvcompile.calibrate(make_tiny_model("llama"), Recipe(kv_group_size=2, rope="post"), chunks, progress=False)


def test_the_fingerprint_is_stored(tmp_path):
    PRUNE.save(tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["fingerprint"] == PRUNE.fingerprint()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("k_channels"), r"plan.json: field k_channels is missing"),
        (lambda d: d.update(k_channels={"abc": [1, 1]}), r"field k_channels: layer keys are non-negative integers, got 'abc'"),
        (lambda d: d.update(k_channels={"0": "8,4"}), r"field k_channels.0: expected list, got str"),
        (lambda d: d.update(k_channels={"0": [8, -4]}), r"field k_channels.0: expected non-negative ints, got -4"),
        (lambda d: d.update(k_channels={"0": [8, 5]}), r"field k_channels.0: counts \[8, 5\] do not match the 12 ids"),
        (lambda d: d.update(model={"num_layers": 2, "colour": "red"}), r"field model: expected keys"),
        (lambda d: d.update(sink="2"), r"field sink: expected int, got str"),
        (lambda d: d.update(meta=[]), r"field meta: expected dict, got list"),
        (lambda d: d.update(version=7), r"plan format version 7"),
        (lambda d: d.pop("fingerprint"), r"field fingerprint is missing"),
    ],
)
def test_malformed_plan_json_names_the_file_and_the_field(tmp_path, edit, message):
    PRUNE.save(tmp_path)
    _edit_json(tmp_path, edit)
    with pytest.raises(PlanError, match=message) as error:
        Plan.load(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "plan.json").write_text("{not json"), r"plan.json: not valid JSON"),
        (lambda folder: (folder / "plan.json").write_text("[1, 2]"), r"field \(the document\): expected dict, got list"),
        (lambda folder: (folder / "tensors.safetensors").write_bytes((folder / "tensors.safetensors").read_bytes()[:40]),
         r"tensors.safetensors: its content is not the one recorded"),
        (lambda folder: (folder / "tensors.safetensors").unlink(), r"tensors.safetensors: no such file"),
    ],
)
def test_broken_plan_files_are_named(tmp_path, damage, message):
    PRUNE.save(tmp_path)
    damage(tmp_path)
    with pytest.raises(PlanError, match=message):
        Plan.load(tmp_path)


def test_a_truncated_tensors_file_of_an_unchecked_plan_is_named(tmp_path):
    """Plans of format version 1 carry no digest: a truncated tensors file still names itself."""
    PRUNE.save(tmp_path)
    _edit_json(tmp_path, lambda d: d.update(version=1))
    (tmp_path / "tensors.safetensors").write_bytes((tmp_path / "tensors.safetensors").read_bytes()[:40])
    with pytest.raises(PlanError, match=r"tensors.safetensors: not a readable safetensors file"):
        Plan.load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_tensors_file_is_refused_not_waited_on(tmp_path):
    PRUNE.save(tmp_path)
    (tmp_path / "tensors.safetensors").unlink()
    os.mkfifo(tmp_path / "tensors.safetensors")
    with pytest.raises(PlanError, match="tensors.safetensors: not a regular file"):
        Plan.load(tmp_path)


def test_a_plan_of_many_heads_loads_each_head_in_order(tmp_path):
    """Loading splits the stored ids by running offsets (it summed every head's prefix before: the
    square of the head count, 8 s for 40,000 heads)."""
    heads = [[h % 16] for h in range(20000)] + [[] for _ in range(20000)]
    Plan.from_k_channels({0: heads}).save(tmp_path)
    assert Plan.load(tmp_path).k_channels[0] == tuple(tuple(ids) for ids in heads)


# -- LeanK checkpoints ----------------------------------------------------------------------------------


def _tiny_leank_model(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         initializer_range=0.2, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _short_leank(model, checkpoint_dir, **kwargs):
    from kvcompile.calibration.recipe import LeanKTraining, Recipe
    from kvcompile.evaluation.text import calibration_text
    from tests.tiny_models import byte_level_tokenizer

    training = LeanKTraining(stage1_steps=2, stage2_steps=2, lr=0.1, lengths=(384,), tasks=("passkey",), checkpoint_every=1)
    recipe = Recipe(k_sparsity=0.5, align=4, k_method="leank", leank=training)
    return kvcompile.calibrate(model, recipe, [calibration_text()[:20000]], tokenizer=byte_level_tokenizer(),
                               progress=False, checkpoint_dir=checkpoint_dir, **kwargs)


def test_a_checkpoint_of_another_model_of_the_same_shape_is_refused(tmp_path):
    from kvcompile.calibration.recipe import RecipeError

    _short_leank(_tiny_leank_model(0), tmp_path)
    with pytest.raises(RecipeError, match="another model or recipe"):
        _short_leank(_tiny_leank_model(1), tmp_path)


EDITS = [
    (lambda state: state.update(stage=7), "stage 7"),
    (lambda state: state.update(step=-5), "step -5"),
    (lambda state: state.update(step=99), "step 99 of 2"),
    (lambda state: state.update(optimizer_steps="many"), "optimizer steps 'many'"),
]


def test_an_edited_checkpoint_is_refused(tmp_path):
    from kvcompile.calibration.recipe import RecipeError

    model = _tiny_leank_model(0)
    _short_leank(model, tmp_path / "trained")
    for index, (edit, message) in enumerate(EDITS):
        edited = shutil.copytree(tmp_path / "trained", tmp_path / f"edit-{index}")
        state = json.loads((edited / "state.json").read_text())
        edit(state)
        (edited / "state.json").write_text(json.dumps(state))
        with pytest.raises(RecipeError, match=re.escape(message)):
            _short_leank(model, edited)


def test_a_checkpoint_interrupted_between_its_files_is_refused(tmp_path, monkeypatch):
    """New tensors beside the previous state.json: resumed, they would pair a stage's factors with
    another's position; the recorded digest refuses them."""
    from kvcompile.calibration import training
    from kvcompile.calibration.recipe import RecipeError

    model = _tiny_leank_model(0)
    saves = {"n": 0}
    real_write_json = training.write_json

    def stop_at_the_third_json(path, document):
        saves["n"] += 1
        if saves["n"] == 3:
            raise KeyboardInterrupt
        real_write_json(path, document)

    monkeypatch.setattr(training, "write_json", stop_at_the_third_json)
    with pytest.raises(KeyboardInterrupt):
        _short_leank(model, tmp_path)
    monkeypatch.undo()
    with pytest.raises(RecipeError, match="state.safetensors: its content is not the one recorded"):
        _short_leank(model, tmp_path)


# -- calibration inputs ---------------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_named_before_tracing():
    from kvcompile.calibration.recipe import Recipe, RecipeError

    chunks = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    chunks[1, 5] = 999
    with pytest.raises(RecipeError, match=r"calibration chunk 1: token id 999 at \(0, 5\) is outside the model's "
                                          r"vocabulary \(0..127\)"):
        kvcompile.calibrate(make_tiny_model("llama"), Recipe(k_sparsity=0.5, align=4), list(chunks), progress=False)


def test_a_model_with_nan_weights_is_refused_by_parameter():
    from kvcompile.calibration.recipe import Recipe, RecipeError

    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(RecipeError, match=r"model parameter model.layers.1.mlp.up_proj.weight holds NaN"):
        kvcompile.calibrate(model, Recipe(k_sparsity=0.5, align=4), torch.randint(3, 128, (1, 16)), progress=False)


# -- the command line -------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as loading the model."""
    from kvcompile import cli

    monkeypatch.setattr(cli, "load_default_model", lambda *args: pytest.fail("loaded the model"))


def _cli_error(argv, capsys) -> str:
    from kvcompile import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--lengths", "512", "9000"], "--lengths 9000: longer than the model's context (8192 tokens)"),
        (["eval", "--quick", "--json", "/nonexistent_dir/r.json"], "--json /nonexistent_dir/r.json: folder /nonexistent_dir does not exist"),
        (["demo", "--plot", "/nonexistent_dir/p.png"], "--plot /nonexistent_dir/p.png: folder /nonexistent_dir does not exist"),
        (["calibrate", "out", "--lr", "nan"], "--lr: must be a finite number, got nan"),
        (["calibrate", "out", "--lr", "0"], "--lr: must be > 0, got 0"),
        (["calibrate", "out", "--l1", "-1"], "--l1: must be >= 0, got -1"),
        (["importance", "smollm2-135m-instruct/leank-k50", "--png", "/nonexistent_dir/i.png"], "folder /nonexistent_dir does not exist"),
    ],
)
def test_settings_that_cannot_work_fail_before_the_model_loads(no_model, capsys, argv, message):
    assert message in _cli_error(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
@pytest.mark.parametrize("command", [["eval", "--quick"], ["calibrate", "out"]])
def test_a_cuda_device_without_cuda_fails_before_the_model_loads(no_model, capsys, command):
    assert "--device cuda: no CUDA device is available" in _cli_error([*command, "--device", "cuda"], capsys)


def test_calibrate_into_a_folder_holding_a_plan_needs_overwrite(no_model, capsys, tmp_path, monkeypatch):
    """Else an interrupted run would leave the old plan.json, which loads as if it were the result;
    with --overwrite the old plan goes when the run starts."""
    from kvcompile import cli

    PRUNE.save(tmp_path)
    assert "already holds a plan: pass --overwrite" in _cli_error(["calibrate", str(tmp_path)], capsys)
    assert (tmp_path / "plan.json").exists()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_default_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["calibrate", str(tmp_path), "--overwrite"])
    assert not (tmp_path / "plan.json").exists()


def test_kvcompile_errors_are_one_line_and_debug_shows_the_traceback(no_model, capsys, tmp_path):
    from kvcompile import cli

    PRUNE.save(tmp_path)
    (tmp_path / "plan.json").write_text("{broken")
    err = _cli_error(["importance", str(tmp_path)], capsys)
    assert err.startswith("kvcompile: error: ") and "plan.json: not valid JSON" in err and err.count("\n") == 1
    with pytest.raises(PlanError, match="not valid JSON"):
        cli.main(["--debug", "importance", str(tmp_path)])


def test_eval_keeps_the_lengths_it_finished_when_interrupted(monkeypatch, tmp_path):
    """The JSON is written after every row at every length: a run stopped in its second length keeps the first."""
    from kvcompile import cli
    from kvcompile.evaluation import evaluate
    from tests.tiny_models import byte_level_tokenizer

    monkeypatch.setattr(cli, "load_default_model", lambda *args: (_tiny_leank_model(0), byte_level_tokenizer()))
    real = evaluate._perplexity_and_agreement

    def stop_at_the_second_length(runner, row, inputs, settings, progress):
        if inputs.length == settings.lengths[1]:
            raise KeyboardInterrupt
        return real(runner, row, inputs, settings, progress)

    monkeypatch.setattr(evaluate, "_perplexity_and_agreement", stop_at_the_second_length)
    path = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["eval", "--quick", "--lengths", "384", "512", "--tasks", "passkey", "--samples", "1", "--ppl-windows", "1",
                  "--no-progress", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["partial"] and list(report["rows"][0]["perplexity"]) == ["384"]
    assert [row["name"] for row in report["rows"]] == ["dense"] and "passkey@384" in report["rows"][0]["accuracy"]
