"""Healing a merge plan by distillation, on a tiny random Llama with byte-level real text: the KL it
removes on held-out text, the student against the compiled programs, the user's model untouched,
resuming, the plain checkpoint of a healed commute merge, and bad inputs."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvcompile
from kvcompile.calibration import heal as healing
from kvcompile.calibration.calibrate import calibration_chunks
from kvcompile.calibration.recipe import RecipeError
from kvcompile.evaluation.text import calibration_text, evaluation_text
from kvcompile.pipeline import canonical_program
from kvcompile.plan import PROJECTIONS
from tests.tiny_models import byte_level_tokenizer, make_tiny_model

TRAINING_TEXT = [calibration_text()[:40000]]
SETTINGS = dict(steps=300, lr=1e-2, rank=16, batch_size=4, chunk_tokens=128, progress=False)
SHORT = {**SETTINGS, "steps": 12}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def model():
    # 2 KV heads of independent random weights: a 2 -> 1 merge of heads that do not duplicate each other
    return make_tiny_model("llama", vocab_size=256)


@pytest.fixture(scope="module")
def captured(model):
    return kvcompile.capture(model)


def _merge_plan(model, tokenizer, rope="commute", **recipe):
    recipe = kvcompile.Recipe(kv_group_size=2, rope=rope, calib_tokens=2048, chunk_tokens=128, **recipe)
    return kvcompile.calibrate(model, recipe, TRAINING_TEXT, tokenizer=tokenizer, progress=False)


@pytest.fixture(scope="module")
def merged(model, tokenizer):
    return _merge_plan(model, tokenizer)


@pytest.fixture(scope="module")
def healed(model, tokenizer, merged, captured):
    return kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **SETTINGS)


def _held_out_kl(model, plan, captured, tokenizer) -> float:
    """Mean KL(dense || transformed) of the next-token distributions on text healing never saw."""
    shape = kvcompile.ModelShape.from_config(model.config)
    dense = canonical_program(captured, kvcompile.Plan.from_k_channels({}))
    transformed = kvcompile.transform(model, plan, program=captured)
    chunks = calibration_chunks([evaluation_text()[:4000]], tokenizer, 2048, 128)
    with torch.no_grad():
        return sum(healing.distillation_loss(healing._logits(dense, shape, chunk), transformed(chunk).logits).item()
                   for chunk in chunks) / len(chunks)


def test_healing_lowers_the_held_out_kl_deterministically(model, tokenizer, merged, healed, captured):
    before = _held_out_kl(model, merged, captured, tokenizer)
    after = _held_out_kl(model, healed, captured, tokenizer)
    # the merge maps alone took off under a third here (2.11 -> 1.5 nats); with the projection updates, half
    assert after < 0.5 * before, (before, after)
    runs = [kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **{**SHORT, "seed": seed})
            for seed in (1, 1, 2)]
    assert runs[0].fingerprint() == runs[1].fingerprint() and runs[0].meta == runs[1].meta
    assert runs[2].fingerprint() != runs[0].fingerprint()  # the seed orders the chunks


def test_the_healed_plan_records_its_healing_and_saves(healed, merged, tmp_path):
    record = healed.meta["heal"]
    assert {k: record[k] for k in ("steps", "lr", "seed", "rank", "batch_size")} == {
        "steps": 300, "lr": 1e-2, "seed": 0, "rank": 16, "batch_size": 4}
    assert record["healed_from"] == merged.fingerprint() and record["final_loss"] < record["initial_loss"]
    assert healed.meta["merge"] == merged.meta["merge"]  # the recipe of the merge it started from
    loaded = kvcompile.Plan.load(healed.save(tmp_path / "healed"))
    assert loaded.fingerprint() == healed.fingerprint() and loaded.meta == healed.meta
    for layer, merge in healed.merges.items():
        assert (merge.groups, merge.rope) == (merged.merges[layer].groups, "commute")
        assert not torch.equal(merge.key_down, merged.merges[layer].key_down)
    assert {layer: sorted(update.factors) for layer, update in loaded.updates.items()} == {
        0: ["key", "output", "query", "value"], 1: ["key", "output", "query", "value"]}
    assert loaded.updates[0].factors["query"][0].shape == (64, 16)


def _student_logits(model, plan, ids, prompt_length):
    shape = kvcompile.ModelShape.from_config(model.config)
    dense = canonical_program(kvcompile.capture(model), kvcompile.Plan.from_k_channels({}))
    with torch.no_grad():
        return healing._Student(dense, plan, shape, rank=0, seed=0).logits(ids, prompt_length)


@pytest.mark.parametrize("rope", ["commute", "post"])
def test_the_student_is_what_transform_runs(model, tokenizer, captured, rope):
    plan = _merge_plan(model, tokenizer, rope)
    plan = kvcompile.heal(model, plan, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **{**SETTINGS, "steps": 5})
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        transformed = kvcompile.transform(model, plan, program=captured)(ids).logits
    torch.testing.assert_close(_student_logits(model, plan, ids, 40), transformed, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def pruned_and_merged(model, tokenizer, merged, captured):
    # layer 0's merged head keeps 8 of its 16 channels, layer 1's none (a streaming head); windows
    # with a small buffer so that the decoded half's past has a middle
    plan = kvcompile.Plan.from_k_channels({0: [list(range(0, 16, 2))], 1: [[]]}, model=merged.model, sink=4, recent=8,
                                          buffer=4).with_merges(merged.merges)
    return kvcompile.heal(model, plan, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **{**SETTINGS, "steps": 3})


@pytest.mark.parametrize("decode", ["call", "steps"])
def test_with_pruned_channels_the_student_is_a_prefill_then_the_decoded_half(model, pruned_and_merged, captured,
                                                                              decode):
    """The student against transform: the chunk's first half a prompt, its second half one decode
    call or one-token steps, as `decode` says."""
    plan = pruned_and_merged
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(4))
    prompt = healing.prompt_length(plan, 48)
    transformed = kvcompile.transform(model, plan, program=captured)
    calls = [ids[:, prompt:]] if decode == "call" else list(ids[:, prompt:].split(1, dim=1))
    with torch.no_grad():
        out = transformed(ids[:, :prompt])
        logits = [out.logits]
        for call in calls:
            out = transformed(call, past_key_values=out.past_key_values)
            logits.append(out.logits)
    want = torch.cat(logits, dim=1)
    shape = kvcompile.ModelShape.from_config(model.config)
    dense = canonical_program(captured, kvcompile.Plan.from_k_channels({}))
    with torch.no_grad():
        student = healing._Student(dense, plan, shape, rank=0, seed=0, decode=decode).logits(ids, prompt)
        other = healing._Student(dense, plan, shape, rank=0, seed=0,
                                 decode={"call": "steps", "steps": "call"}[decode]).logits(ids, prompt)
    torch.testing.assert_close(student, want, atol=1e-4, rtol=0)
    assert (other[:, prompt:] - want[:, prompt:]).abs().max() > 1e-2  # the two ways differ, and the test tells them apart
    dense_rest = _student_logits(model, plan.with_windows(0, 0), ids, 48)[:, prompt:]  # pruning must show
    assert (dense_rest - want[:, prompt:]).abs().max() > 1e-2


def test_the_users_model_is_untouched(model, tokenizer, merged, captured):
    before = {name: param.detach().clone() for name, param in model.state_dict().items()}
    kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **{**SETTINGS, "steps": 3})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert all(param.grad is None for param in model.parameters())
    assert not model.training


def test_a_stopped_run_resumes_to_the_same_plan(model, tokenizer, merged, captured, tmp_path, monkeypatch):
    uninterrupted = kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **SHORT)
    real_step = healing._Trainer._train_step
    calls = {"n": 0}

    def stop_after_seven(self):
        calls["n"] += 1
        if calls["n"] > 7:  # checkpointed at step 5, two steps lost
            raise KeyboardInterrupt
        return real_step(self)

    settings = {**SHORT, "checkpoint_every": 5, "checkpoint_dir": tmp_path}
    monkeypatch.setattr(healing._Trainer, "_train_step", stop_after_seven)
    with pytest.raises(KeyboardInterrupt):
        kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **settings)
    monkeypatch.setattr(healing._Trainer, "_train_step", real_step)
    resumed = kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **settings)
    assert resumed.fingerprint() == uninterrupted.fingerprint() and resumed.meta == uninterrupted.meta
    with pytest.raises(RecipeError, match="another model or recipe"):
        kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured,
                       **{**settings, "lr": 3e-2})


def test_a_healed_commute_merge_saves_as_a_plain_checkpoint(model, healed, captured, tmp_path):
    transformed = kvcompile.transform(model, healed, program=captured)
    transformed.save_pretrained(tmp_path / "gqa")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "gqa").eval()
    assert plain.config.num_key_value_heads == 1
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, transformed(ids).logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def other_models_plan(tokenizer):
    return _merge_plan(make_tiny_model("llama", vocab_size=256, num_layers=3), tokenizer)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(steps=0), RecipeError, "steps must be a positive int"),
        (dict(steps=-3), RecipeError, "steps must be a positive int"),
        (dict(lr=0.0), RecipeError, "lr must be a positive number"),
        (dict(texts=[]), RecipeError, "texts is empty"),
        (dict(texts=["some text"], tokenizer=None), RecipeError, "pass tokenizer="),
        (dict(plan="k-only", rank=0), RecipeError, "nothing to heal"),
        (dict(rank=-1), RecipeError, "rank must be a non-negative int"),
        (dict(batch_size=0), RecipeError, "batch_size must be a positive int"),
        (dict(plan="other model"), kvcompile.PlanError, "made for another model"),
        (dict(tasks=["needle"]), RecipeError, r"unknown tasks \['needle'\]"),
        (dict(decode="tokens"), RecipeError, r"decode must be one of \['call', 'steps'\], got 'tokens'"),
        (dict(tasks=["passkey"], task_share=1.0), RecipeError, r"task_share must be a share of the chunks in \(0, 1\)"),
        (dict(tasks=["passkey"], texts=[torch.randint(0, 256, (1, 128))]), RecipeError,
         "tasks build retrieval prompts from string texts"),
        (dict(tasks=["passkey"]), RecipeError, "tasks need longer chunks than chunk_tokens=128"),
        (dict(projections=["gate"]), RecipeError, r"projections must name some of \['query', 'key', 'value', 'output'\]"),
        (dict(projections=[]), RecipeError, "projections must name some of"),
        (dict(projections=["value", "value"]), RecipeError, "once each"),
    ],
)
def test_bad_inputs_are_clear_errors(model, tokenizer, merged, other_models_plan, change, error, message):
    plans = {"k-only": kvcompile.Plan.from_k_channels({0: [[0, 1], [2, 3]]}), "other model": other_models_plan}
    arguments = dict(plan=merged, texts=TRAINING_TEXT, tokenizer=tokenizer, **{**SETTINGS, "steps": 1})
    arguments.update(change)
    if isinstance(arguments["plan"], str):
        arguments["plan"] = plans[arguments["plan"]]
    with pytest.raises(error, match=message):
        kvcompile.heal(model, arguments.pop("plan"), arguments.pop("texts"), **arguments)


def _held_out_decode_kl(model, plan, captured, tokenizer) -> float:
    """As `_held_out_kl`, with each chunk's second half one decode call after its first (where a
    plan's pruned channels act)."""
    shape = kvcompile.ModelShape.from_config(model.config)
    dense = canonical_program(captured, kvcompile.Plan.from_k_channels({}))
    transformed = kvcompile.transform(model, plan, program=captured)
    chunks = calibration_chunks([evaluation_text()[:4000]], tokenizer, 2048, 128)
    total = 0.0
    with torch.no_grad():
        for chunk in chunks:
            prompt = healing.prompt_length(plan, chunk.shape[1])
            first = transformed(chunk[:, :prompt])
            rest = transformed(chunk[:, prompt:], past_key_values=first.past_key_values).logits
            total += healing.distillation_loss(healing._logits(dense, shape, chunk)[:, prompt:], rest).item()
    return total / len(chunks)


def test_healing_a_k_channel_plan_trains_projection_updates_only(model, tokenizer, captured):
    recipe = kvcompile.Recipe(k_sparsity=0.75, calib_tokens=2048, chunk_tokens=128)
    # windows with a small buffer, so that a 64-token prompt leaves a pruned middle
    pruned = kvcompile.calibrate(model, recipe, TRAINING_TEXT, tokenizer=tokenizer, progress=False).with_windows(4, 16, 8)
    healed = kvcompile.heal(model, pruned, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **SETTINGS)
    assert healed.k_channels == pruned.k_channels and (healed.sink, healed.recent) == (pruned.sink, pruned.recent)
    assert not healed.merges and sorted(healed.updates) == [0, 1]
    before = _held_out_decode_kl(model, pruned, captured, tokenizer)
    after = _held_out_decode_kl(model, healed, captured, tokenizer)
    # 1.28 -> 1.08 nats: a quarter of the channels, two rotary pairs per head, bound what queries can score
    assert after < 0.9 * before, (before, after)


def test_healing_updates_only_the_projections_asked_for(model, tokenizer, captured):
    pruned = kvcompile.Plan.from_k_channels({0: [[0, 1, 2, 3], [4, 5, 6, 7]], 1: [[8, 9, 10, 11], [0, 2, 4, 6]]})
    healed = kvcompile.heal(model, pruned, TRAINING_TEXT, tokenizer=tokenizer, program=captured,
                            projections=("output", "value"), **SHORT)
    assert {layer: sorted(update.factors) for layer, update in healed.updates.items()} == {0: ["output", "value"],
                                                                                          1: ["output", "value"]}
    assert healed.meta["heal"]["projections"] == ["output", "value"]
    # healing it again on every projection trains the ones it has and adds the others
    again = kvcompile.heal(model, healed, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **{**SHORT, "steps": 1})
    assert all(sorted(update.factors) == sorted(PROJECTIONS) for update in again.updates.values())


def test_chunks_too_short_for_a_pruned_middle_are_refused(model, tokenizer):
    plan = kvcompile.Plan.from_k_channels({0: [[0, 1], [2, 3]]}).with_windows(64, 256)
    assert healing.default_chunk_tokens(plan) == 4 * (64 + 256 + 128)
    with pytest.raises(RecipeError, match=r"a chunk of 512 tokens prefills 256, which the plan's windows .* hold whole"):
        kvcompile.heal(model, plan, TRAINING_TEXT, tokenizer=tokenizer, **{**SETTINGS, "chunk_tokens": 512})


def test_the_student_of_a_plan_with_some_updates_is_what_transform_runs(model, merged, captured):
    from tests.test_update_projections import random_updates

    plan = merged.with_updates(random_updates(model, [1], ("key", "output")))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        transformed = kvcompile.transform(model, plan, program=captured)(ids).logits
    torch.testing.assert_close(_student_logits(model, plan, ids, 40), transformed, atol=1e-4, rtol=0)


def test_retrieval_prompts_join_at_their_share_and_are_scored_at_their_answers(model, tokenizer, merged, captured):
    from kvcompile.evaluation.tasks import make_samples

    settings = dict(steps=6, lr=1e-2, rank=4, batch_size=4, chunk_tokens=384, tasks=("passkey",), progress=False)
    plan_settings = healing._Settings(6, 1e-2, 0, 0.1, 384, 2048, 4, 4, ("passkey",), 0.25)
    chunks = healing.task_chunks(plan_settings, tokenizer, TRAINING_TEXT[0])
    samples = make_samples("passkey", tokenizer, 384, 6, 0, haystack_text=TRAINING_TEXT[0])
    assert len(chunks) == 6  # a quarter of 24 draws, each its own prompt
    for chunk, sample in zip(chunks, samples):
        answer = sample.answer_ids(tokenizer)
        assert torch.equal(chunk.ids, torch.cat([sample.prompt_ids, answer], dim=1)[:, -384:])
        assert chunk.scored_tail == answer.shape[1] + 1

    text = [healing._Chunk(torch.zeros(1, 8, dtype=torch.long)) for _ in range(5)]
    order = healing._chunk_order(text + chunks, plan_settings)
    assert [draw for draw, i in enumerate(order) if i >= len(text)] == [3, 7, 11, 15, 19, 23]
    assert sorted(i for i in order if i >= len(text)) == list(range(5, 11))
    without_tasks = healing._chunk_order(text, healing._Settings(6, 1e-2, 0, 0.1, 384, 2048, 4, 4))
    assert [i for i in order if i < len(text)] == without_tasks[:18]  # text draws as a run without tasks

    healed = kvcompile.heal(model, merged, TRAINING_TEXT, tokenizer=tokenizer, program=captured, **settings)
    record = healed.meta["heal"]
    assert record["tasks"] == ["passkey"] and record["task_share"] == 0.25
    assert math.isfinite(record["final_loss"]) and healed.fingerprint() != merged.fingerprint()


def test_a_scored_loss_averages_each_rows_scored_positions():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 5, 7, generator=generator), torch.randn(3, 5, 7, generator=generator)
    scored = torch.tensor([[True] * 5, [False, False, False, True, True], [False, False, False, False, True]])
    per_position = torch.stack([healing.distillation_loss(teacher[:, j], student[:, j]) for j in range(5)])
    rows = [torch.stack([healing.distillation_loss(teacher[b, j], student[b, j]) for j in range(5) if scored[b, j]])
            for b in range(3)]
    want = torch.stack([row.mean() for row in rows]).mean()
    torch.testing.assert_close(healing.distillation_loss(teacher, student, scored), want)
    torch.testing.assert_close(healing.distillation_loss(teacher, student), per_position.mean())
