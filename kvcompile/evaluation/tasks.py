"""Long-context retrieval tasks in the style of RULER, and their exact-match scoring.

A sample hides needles (short made-up facts) in a haystack of real text, asks about them after
the haystack, and starts the answer in the assistant turn. Everything is drawn from a
`random.Random` seeded by (task, seed, sample index), so a sample is the same on every run and for
every tokenizer; only where the haystack is cut depends on the tokenizer, which measures the prompt.

- passkey: one pass key (a 5-digit number); ask for it.
- multikey (RULER niah_multikey): four key -> value needles, word-like keys with 7-digit numbers or
  UUID keys with UUID values (alternating sample by sample); ask for one key's value.
- multivalue (RULER niah_multivalue): four 7-digit values of one key; ask for all of them.
- vartrack (RULER variable tracking): "VAR A = 12345", then "VAR B = VAR A", ... four hops; ask
  which variables hold 12345.

Sample i of n puts its (first) asked needle at depth (i + 0.5) / n of the haystack. Needles that are
all asked for (multivalue, vartrack) follow at steps of 1/m, wrapping around, in text order.
"""

from __future__ import annotations

import bisect
import functools
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
from transformers import PreTrainedTokenizerBase

from .text import evaluation_text

TASKS = ("passkey", "multikey", "multivalue", "vartrack")

NEEDLES_PER_KEY = 4  # RULER's num_needle_k for multikey and num_needle_v for multivalue
VARTRACK_HOPS = 4
# a reply may open with a newline or close with a word more than the ideal answer
ANSWER_SLACK_TOKENS = 4
# small models number several answers as a list ("1. ...\n") rather than separate them by commas
LIST_ITEM_SLACK_TOKENS = 2


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no single truth value to compare by
class Sample:
    task: str
    context_tokens: int
    depth: float
    seed: int  # make_samples' seed; with depth it tells the samples of one call apart
    prompt_ids: torch.Tensor  # (1, n) token ids, chat-templated when the tokenizer has a template
    answers: tuple[str, ...]  # every string that must appear (exact match)
    ideal_answer: str  # a perfect reply's continuation of the prompt; training targets it
    max_new_tokens: int  # enough for the answer

    def answer_ids(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """The ideal answer's token ids (1, n), as they follow the prompt."""
        return tokenizer(self.ideal_answer, add_special_tokens=False, return_tensors="pt").input_ids


@dataclass(frozen=True)
class _Puzzle:
    """What a task puts into a prompt, before the haystack is cut to fit."""

    instruction: str
    needles: tuple[tuple[float, str], ...]  # (depth in the haystack, line of text)
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    ideal_answer: str  # what follows answer_prefix in a perfect reply; sizes max_new_tokens


@dataclass(frozen=True)
class _Haystack:
    lines: tuple[str, ...]  # each ends with a newline
    line_tokens: tuple[int, ...]  # tokens of each line on its own: an estimate, the prompt is measured whole
    paragraph_starts: tuple[int, ...]


def make_samples(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    context_tokens: int,
    n: int,
    seed: int,
    *,
    haystack_text: str | None = None,
) -> list[Sample]:
    """`n` samples of `task` whose prompts are at most (and close to) `context_tokens` tokens.

    The haystack is cut from `haystack_text` (default: `evaluation_text()`), read as a loop so
    that any context length can be filled.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    haystack = _haystack(tokenizer, evaluation_text() if haystack_text is None else haystack_text)
    return [_make_sample(task, tokenizer, haystack, context_tokens, seed, index, n) for index in range(n)]


def score(sample: Sample, generated_text: str) -> bool:
    """Whether every answer appears in `generated_text` as a whole word, case-sensitively."""
    return all(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", generated_text) for answer in sample.answers)


def _make_sample(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    haystack: _Haystack,
    context_tokens: int,
    seed: int,
    index: int,
    n: int,
) -> Sample:
    # a string seed is hashed with SHA-512: stable across runs, unlike hash()
    rng = random.Random(f"kvcompile.tasks/{task}/{seed}/{index}")
    depth = (index + 0.5) / n
    start = rng.choice(haystack.paragraph_starts)
    puzzle = _puzzle(task, rng, depth, alternate=(seed + index) % 2 == 1)
    prompt_ids = _fit_prompt(tokenizer, haystack, start, puzzle, context_tokens)
    answer_tokens = len(tokenizer(puzzle.ideal_answer, add_special_tokens=False).input_ids)
    return Sample(
        task=task,
        context_tokens=context_tokens,
        depth=depth,
        seed=seed,
        prompt_ids=torch.tensor([prompt_ids], dtype=torch.long),
        answers=puzzle.answers,
        ideal_answer=puzzle.ideal_answer,
        max_new_tokens=answer_tokens + ANSWER_SLACK_TOKENS + LIST_ITEM_SLACK_TOKENS * len(puzzle.answers),
    )


# ---- the tasks ----


def _puzzle(task: str, rng: random.Random, depth: float, alternate: bool) -> _Puzzle:
    if task == "passkey":
        return _passkey(rng, depth)
    if task == "multikey":
        return _multikey(rng, depth, uuids=alternate)
    if task == "multivalue":
        return _multivalue(rng, depth)
    return _vartrack(rng, depth)


def _passkey(rng: random.Random, depth: float) -> _Puzzle:
    key = _number(rng, 5)
    return _Puzzle(
        instruction=(
            "There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about it afterwards."
        ),
        needles=((depth, f"The pass key is {key}. Remember it. {key} is the pass key."),),
        question="What is the pass key? Answer briefly.",
        answer_prefix="The pass key is",
        answers=(key,),
        ideal_answer=f" {key}.",
    )


def _multikey(rng: random.Random, depth: float, uuids: bool) -> _Puzzle:
    kind = "uuid" if uuids else "number"
    keys = _distinct(rng, _uuid if uuids else _word_key, NEEDLES_PER_KEY)
    values = _distinct(rng, _uuid if uuids else lambda r: _number(r, 7), NEEDLES_PER_KEY)
    # the asked needle sits at the sample's depth, the distractors anywhere
    depths = [depth] + [rng.random() for _ in keys[1:]]
    needles = tuple(
        (at, f"One of the special magic {kind}s for {key} is: {value}.") for at, key, value in zip(depths, keys, values)
    )
    return _Puzzle(
        instruction=_magic_instruction(kind),
        needles=needles,
        question=f"What is the special magic {kind} for {keys[0]} mentioned in the provided text? Answer briefly.",
        answer_prefix=f"The special magic {kind} for {keys[0]} mentioned in the provided text is",
        answers=(values[0],),
        ideal_answer=f" {values[0]}.",
    )


def _multivalue(rng: random.Random, depth: float) -> _Puzzle:
    key = _word_key(rng)
    values = _distinct(rng, lambda r: _number(r, 7), NEEDLES_PER_KEY)
    needles = tuple(
        (at, f"One of the special magic numbers for {key} is: {value}.")
        for at, value in zip(_spread(depth, len(values)), values)
    )
    return _Puzzle(
        instruction=_magic_instruction("number"),
        needles=needles,
        question=f"What are all the special magic numbers for {key} mentioned in the provided text? Answer briefly.",
        answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
        answers=values,
        ideal_answer=f" {', '.join(values)}.",
    )


def _vartrack(rng: random.Random, depth: float) -> _Puzzle:
    value = _number(rng, 5)
    names = _distinct(rng, _variable_name, VARTRACK_HOPS + 1)
    assignments = [f"VAR {names[0]} = {value}"] + [f"VAR {name} = VAR {prior}" for prior, name in zip(names, names[1:])]
    return _Puzzle(
        instruction="Memorize and track the chain of variable assignments hidden in the following text.",
        needles=tuple(zip(_spread(depth, len(assignments)), assignments)),
        question=f"Question: Find all variables that are assigned the value {value} in the text above. Answer briefly.",
        answer_prefix=(
            f"According to the chain of variable assignments in the text above, {len(names)} variables "
            f"are assigned the value {value}, they are:"
        ),
        answers=names,
        ideal_answer=f" {', '.join(names)}.",
    )


def _magic_instruction(kind: str) -> str:
    return (
        f"Some special magic {kind}s are hidden within the following text. "
        f"Make sure to memorize them. I will quiz you about the {kind}s afterwards."
    )


def _spread(depth: float, count: int) -> list[float]:
    """`count` depths 1/count apart, one of them `depth`, ascending: needles in text order."""
    return sorted((depth + step / count) % 1.0 for step in range(count))


def _distinct(rng: random.Random, draw: Callable[[random.Random], str], count: int) -> tuple[str, ...]:
    drawn: list[str] = []
    while len(drawn) < count:
        candidate = draw(rng)
        if candidate not in drawn:
            drawn.append(candidate)
    return tuple(drawn)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    # two pronounceable made-up words, like RULER's adjective-noun keys but never in the haystack
    return f"{_pseudo_word(rng)}-{_pseudo_word(rng)}"


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


# ---- haystack and prompt ----


# Tokenizing every line of the text costs more than fitting a 4K prompt; reuse it across calls. The
# counts only place needles and start the search: a tokenizer changed since could shift a needle by a
# line, never push a prompt past its length, which is always measured.
@functools.lru_cache(maxsize=4)
def _haystack(tokenizer: PreTrainedTokenizerBase, text: str) -> _Haystack:
    # the blank line at the end keeps the last paragraph apart from the first when the text loops
    lines = tuple((text.strip("\n") + "\n\n").splitlines(keepends=True))
    if len(lines) < 2:
        raise ValueError("the haystack text is empty")
    line_tokens = tuple(len(ids) for ids in tokenizer(list(lines), add_special_tokens=False).input_ids)
    paragraph_starts = tuple(
        index for index, line in enumerate(lines) if line.strip() and (index == 0 or not lines[index - 1].strip())
    )
    return _Haystack(lines, line_tokens, paragraph_starts)


def _fit_prompt(
    tokenizer: PreTrainedTokenizerBase, haystack: _Haystack, start: int, puzzle: _Puzzle, context_tokens: int
) -> list[int]:
    """The prompt with the most haystack lines (from `start`) that keeps it within `context_tokens`."""

    @functools.cache
    def prompt(line_count: int) -> list[int]:
        return _prompt_ids(tokenizer, puzzle, _haystack_with_needles(haystack, start, line_count, puzzle.needles))

    def fits(line_count: int) -> bool:
        return len(prompt(line_count)) <= context_tokens

    room = context_tokens - len(prompt(0))
    if room < 0:
        raise ValueError(f"{context_tokens} tokens cannot hold the task's instruction, needles and question")
    # The lines' own token counts only estimate the whole (tokens merge across line ends), so one
    # measurement rescales the estimate and a search from there settles it.
    first_guess, estimated = _lines_within(haystack, start, room)
    if first_guess == 0:
        return prompt(0)
    scale = (len(prompt(first_guess)) - len(prompt(0))) / estimated
    second_guess, _ = _lines_within(haystack, start, room / scale)
    return prompt(_largest_fitting(fits, second_guess))


def _lines_within(haystack: _Haystack, start: int, tokens: float) -> tuple[int, int]:
    """How many lines from `start` fit in `tokens` by their own token counts, and their tokens."""
    count, total = 0, 0
    while True:
        line_tokens = haystack.line_tokens[(start + count) % len(haystack.lines)]
        if total + line_tokens > tokens:
            return count, total
        count, total = count + 1, total + line_tokens


def _largest_fitting(fits: Callable[[int], bool], guess: int) -> int:
    """The largest count that `fits`, searched from `guess`; `fits` is monotone and fits(0)."""
    step = 1
    if fits(guess):
        while fits(guess + step):
            guess, step = guess + step, 2 * step
        fitting, too_many = guess, guess + step
    else:
        while not fits(max(guess - step, 0)):
            guess, step = guess - step, 2 * step
        fitting, too_many = max(guess - step, 0), guess
    while too_many - fitting > 1:
        middle = (fitting + too_many) // 2
        fitting, too_many = (middle, too_many) if fits(middle) else (fitting, middle)
    return fitting


def _haystack_with_needles(
    haystack: _Haystack, start: int, line_count: int, needles: tuple[tuple[float, str], ...]
) -> str:
    indices = [(start + offset) % len(haystack.lines) for offset in range(line_count)]
    lines = [haystack.lines[index] for index in indices]
    # the boundary whose share of the haystack's tokens is closest to each needle's depth
    before = list(accumulate((haystack.line_tokens[index] for index in indices), initial=0))
    boundaries = [_nearest(before, depth * before[-1]) for depth, _ in needles]
    placed = sorted(zip(boundaries, (needle for _, needle in needles)), key=lambda pair: pair[0])
    for already_inserted, (boundary, needle) in enumerate(placed):
        lines.insert(boundary + already_inserted, needle + "\n")
    return "".join(lines).strip("\n")


def _nearest(ascending: list[int], target: float) -> int:
    """Index of the value closest to `target`, which lies within [ascending[0], ascending[-1]]."""
    right = bisect.bisect_left(ascending, target)
    if right == 0:
        return 0
    return right if ascending[right] - target < target - ascending[right - 1] else right - 1


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, puzzle: _Puzzle, haystack: str) -> list[int]:
    request = f"{puzzle.instruction}\n\n{haystack}\n\n{puzzle.question}"
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
        )
        # add_special_tokens=False: the template has written them; the prefix opens the assistant turn
        return _token_ids(tokenizer, chat) + _token_ids(tokenizer, puzzle.answer_prefix)
    return tokenizer(f"{request}\n\n{puzzle.answer_prefix}", verbose=False).input_ids


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids
