"""LeanK training on a tiny random Llama with byte-level real text: the mask's arithmetic, the
scaled program against the dense one, the loss, the sparsity, resuming."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvcompile
from kvcompile.calibration import importance, leank
from kvcompile.calibration.recipe import LeanKTraining, Recipe, RecipeError
from kvcompile.evaluation.text import calibration_text
from kvcompile.pipeline import canonical_program
from tests.tiny_models import byte_level_tokenizer

TRAINING = LeanKTraining(stage1_steps=6, stage2_steps=4, lr=0.1, lengths=(384,), tasks=("passkey",), checkpoint_every=2)
RECIPE = Recipe(k_sparsity=0.5, align=4, k_method="leank", sink=4, recent=8, leank=TRAINING)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         initializer_range=0.2, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _learn(model, tokenizer, recipe=RECIPE, **kwargs):
    return kvcompile.calibrate(model, recipe, [calibration_text()[:20000]], tokenizer=tokenizer, progress=False, **kwargs)


@pytest.fixture(scope="module")
def learned(model, tokenizer):
    """RECIPE's plan, trained once for the tests that read it (training is deterministic)."""
    return _learn(model, tokenizer)


@pytest.mark.parametrize("sparsity, align", [(0.5, 4), (0.7, 4), (0.7, 16), (0.0, 8)])
def test_hard_mask_keeps_the_target_share_in_aligned_counts(sparsity, align):
    factors = torch.rand(3, 2, 16, generator=torch.Generator().manual_seed(1))
    mask = leank.hard_mask(factors, sparsity, align)
    kept = mask.sum(dim=-1)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(kept % align == 0)
    assert abs(kept.sum().item() - factors.numel() * (1 - sparsity)) <= align / 2
    # within a head the kept channels are its best ones
    for layer in range(3):
        for head in range(2):
            count = int(kept[layer, head])
            best = factors[layer, head].topk(count).indices if count else torch.tensor([], dtype=torch.long)
            assert set(mask[layer, head].nonzero().flatten().tolist()) == set(best.tolist())


def test_hard_mask_ranks_globally_and_may_empty_a_head():
    factors = torch.full((1, 2, 8), 0.1)
    factors[0, 0] = 0.9  # one head carries everything
    mask = leank.hard_mask(factors, sparsity=0.5, align=4)
    assert mask[0, 0].sum() == 8 and mask[0, 1].sum() == 0  # the other becomes a streaming head


def test_middle_keys_are_past_the_sink_and_outside_the_recent_window():
    middle = leank._middle_keys(queries=3, keys=10, sink=2, recent=3, device="cpu")
    for i in range(3):
        sees = 10 - 3 + i + 1
        expected = [2 <= j < sees - 3 for j in range(10)]
        assert middle[i].tolist() == expected


def test_scaled_program_with_unit_factors_is_the_dense_program(model, tokenizer):
    shape = kvcompile.ModelShape.from_config(model.config)
    canonical = canonical_program(kvcompile.capture(model), kvcompile.Plan.from_k_channels({}))
    trainer = leank._Trainer(canonical, shape, 0.5, 4, 2, 3, TRAINING, tokenizer, calibration_text()[:20000])
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    answer = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = leank._prefill(trainer.dense, shape, prompt)
        dense = leank._run(trainer.dense, answer, 40, cache)
        torch.testing.assert_close(leank._run(trainer.scaled, answer, 40, cache), dense, atol=1e-5, rtol=1e-5)
        trainer.factors.zero_()  # middle keys now score 0: the output must move
        assert (leank._run(trainer.scaled, answer, 40, cache) - dense).abs().max() > 1e-3


def test_training_lowers_the_loss_and_meets_the_sparsity_exactly(learned):
    plan = learned
    counts = [n for layer in range(2) for n in plan.kept_counts(layer)]
    assert all(n % 4 == 0 for n in counts)
    assert sum(counts) == 2 * 2 * 16 // 2
    assert plan.meta["method"] == "leank" and plan.meta["sink"] == 4 and plan.meta["recent"] == 8
    assert plan.meta["training"]["seed"] == TRAINING.seed
    assert plan.meta["final_loss"]["stage1"] is not None and plan.meta["final_loss"]["stage2"] is not None


def test_stage_one_loss_falls(model, tokenizer):
    shape = kvcompile.ModelShape.from_config(model.config)
    canonical = canonical_program(kvcompile.capture(model), kvcompile.Plan.from_k_channels({}))
    training = LeanKTraining(stage1_steps=10, stage2_steps=1, lr=0.01, warmup=0.0, lengths=(384,), tasks=("passkey",))
    trainer = leank._Trainer(canonical, shape, 0.5, 4, 4, 8, training, tokenizer, calibration_text()[:20000])
    trainer.samples = trainer.samples[:1]  # one prompt: the loss curve is the optimizer's, not the data's
    trainer.run(None, progress=False)
    losses = trainer.losses[1]
    assert losses[-1] < losses[0] - 1e-3
    assert 0 <= trainer.factors.min() < 1 and trainer.factors.max() <= 1


def test_a_stopped_run_resumes_to_the_same_plan(model, tokenizer, learned, tmp_path, monkeypatch):
    uninterrupted = learned
    real_step = leank._Trainer._train_step
    calls = {"n": 0}

    def stop_after_seven(self, steps):
        calls["n"] += 1
        if calls["n"] > 7:  # stage 1 done (6 steps, checkpointed), one step into stage 2
            raise KeyboardInterrupt
        return real_step(self, steps)

    monkeypatch.setattr(leank._Trainer, "_train_step", stop_after_seven)
    with pytest.raises(KeyboardInterrupt):
        _learn(model, tokenizer, checkpoint_dir=tmp_path)
    monkeypatch.setattr(leank._Trainer, "_train_step", real_step)
    resumed = _learn(model, tokenizer, checkpoint_dir=tmp_path)
    assert resumed.k_channels == uninterrupted.k_channels
    assert resumed.meta["final_loss"] == pytest.approx(uninterrupted.meta["final_loss"])


def test_a_checkpoint_of_another_recipe_is_refused(model, tokenizer, tmp_path):
    short = Recipe(k_sparsity=0.5, align=4, k_method="leank", leank=LeanKTraining(stage1_steps=1, stage2_steps=1, lengths=(384,), tasks=("passkey",)))
    _learn(model, tokenizer, short, checkpoint_dir=tmp_path)
    with pytest.raises(RecipeError, match="another model or recipe"):
        _learn(model, tokenizer, checkpoint_dir=tmp_path)


@pytest.mark.parametrize(
    "recipe, message",
    [
        (Recipe(k_sparsity=0.5, k_method="learned"), "k_method must be one of"),
        (Recipe(k_sparsity=0.5, k_method="leank", sink=-1), "sink and recent"),
        (Recipe(k_sparsity=0.5, k_method="leank", kv_group_size=2), "merged heads"),
        (Recipe(k_sparsity=0.5, k_method="leank", leank=LeanKTraining(lengths=(16,))), "lengths must be"),
        (Recipe(k_sparsity=0.5, k_method="leank", leank=LeanKTraining(tasks=("nope",))), "unknown task"),
    ],
)
def test_bad_leank_recipes_are_clear_errors(model, tokenizer, recipe, message):
    with pytest.raises(RecipeError, match=message):
        _learn(model, tokenizer, recipe)


def test_leank_needs_text_and_a_tokenizer(model):
    with pytest.raises(RecipeError, match="pass strings and tokenizer"):
        kvcompile.calibrate(model, RECIPE, torch.randint(0, 256, (1, 64)), progress=False)


def test_the_plan_carries_its_factors_windows_and_provenance(learned, tmp_path):
    plan = learned
    assert (plan.sink, plan.recent) == (RECIPE.sink, RECIPE.recent)
    assert plan.importance.shape == (2, 2, 16) and 0 <= plan.importance.min() and plan.importance.max() <= 1
    mask = leank.hard_mask(plan.importance, RECIPE.k_sparsity, RECIPE.align)
    assert all(list(plan.k_channels[layer][head]) == mask[layer, head].nonzero().flatten().tolist()
               for layer in range(2) for head in range(2))
    loaded = kvcompile.Plan.load(plan.save(tmp_path / "plan"))
    assert torch.equal(loaded.importance, plan.importance) and loaded.meta == plan.meta


def test_importance_summary_and_heatmap(learned, tmp_path):
    pytest.importorskip("matplotlib")
    plan = learned
    lines = importance.summary(plan).splitlines()
    assert len(lines) == 1 + 2
    streaming = sum(count == 0 for layer in range(2) for count in plan.kept_counts(layer))
    assert sum(line.split()[1:3].count("S") for line in lines[1:]) == streaming
    assert importance.plot(plan, tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(kvcompile.PlanError, match="no learned importance"):
        importance.summary(kvcompile.Plan.from_k_channels({0: [[0], [1]]}))
