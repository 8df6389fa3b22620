"""Evaluation: a plan's accuracy and memory against the dense model, on the same inputs, in one run.

Rows are methods (dense, baselines, plans); for each context length every row sees the same
RULER-style retrieval prompts (tasks.py), the same perplexity windows and the same agreement
prompts. Every scored token after the prompt goes through a decode step on the row's compressed
cache. Plans that leave the model alone until the cache (K-channel pruning) start from one shared
dense prefill through their compiled cache encoder, which writes exactly what their own prefill
would; plans that merge heads prefill themselves.

Rows are measured one after another, each over every input of a length, so that a row is finished
(and can be saved) before the next starts; the dense prefills of a length are computed once and
kept for all rows (their caches: one per input of the length, in memory at once).
"""

from __future__ import annotations

import inspect
import io
import math
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import DynamicCache

from kvcompile.cache import CompressedKVCache
from kvcompile.capture import CACHE_NAME
from kvcompile.plan import Plan
from kvcompile.runtime import TransformedModel, transform
from kvcompile.stores import write_atomically

from . import tasks, text


@dataclass(frozen=True)
class EvalSettings:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    tasks: tuple[str, ...] = tasks.TASKS
    samples: int = 4  # retrieval prompts per task and length
    ppl_windows: int = 2  # perplexity windows per length
    score_last: int = 32  # scored tokens at the end of each window, one decode step each
    agreement_tokens: int = 16  # greedy tokens of the dense model after each window's prefix
    seed: int = 20261122  # evaluation seed; training uses other seeds


QUICK = EvalSettings(lengths=(512,), tasks=("passkey", "multikey"), samples=2, ppl_windows=1, score_last=8,
                     agreement_tokens=4)
# `kvcompile demo`: perplexity and greedy agreement at 2K, no retrieval. On 2 CPU cores a retrieval
# prompt costs a 2K dense prefill and up to a few dozen decode steps per row: 16 prompts alone
# would take longer than the whole demo's five-minute budget.
DEMO = EvalSettings(lengths=(2048,), tasks=())


@dataclass
class Method:
    """One row: `plan` None is the dense model."""

    name: str
    plan: Plan | None = None


@dataclass
class Row:
    name: str
    plan_fingerprint: str | None
    accuracy: dict = field(default_factory=dict)  # "task@length" -> {correct, samples, accuracy, ci95}
    perplexity: dict = field(default_factory=dict)  # "length" -> value
    agreement: dict = field(default_factory=dict)  # "length" -> fraction of dense greedy tokens
    k_bytes_per_token: float = 0.0
    v_bytes_per_token: float = 0.0
    k_bytes_per_token_formula: float | None = None  # the plan's count at the measured cache length
    v_bytes_per_token_formula: float | None = None
    bytes_measured_at: int = 0  # the cache length (tokens) the bytes per token were measured at
    capacity_bytes_per_token: float = 0.0  # K+V bytes allocated (held tokens and free slots) per token held


def evaluate(model, tokenizer, methods: list[Method], settings: EvalSettings = EvalSettings(), *,
             model_name: str = "", progress: bool = True, program=None, on_method=None) -> dict:
    """Every number of the table, with the configuration that produced it, as one JSON-ready dict.

    `program`, from `kvcompile.capture(model)`, is compiled for every plan instead of tracing anew.
    `on_method(report)` is called after each method at each length but the last with the report so
    far (`"partial": true`, the rows measured so far), e.g. to save it."""
    max_length = getattr(model.config, "max_position_embeddings", None)
    too_long = [length for length in settings.lengths if max_length is not None and length > max_length]
    if too_long:
        raise ValueError(f"context lengths {too_long} exceed the model's maximum {max_length}")
    runners = [_Runner(model, method, program) for method in methods]
    rows = [Row(m.name, None if m.plan is None else m.plan.fingerprint()) for m in methods]
    device = next(model.parameters()).device
    steps = len(settings.lengths) * len(methods)
    for length_index, length in enumerate(settings.lengths):
        inputs = _LengthInputs(model, tokenizer, settings, length, device)
        for method_index, (runner, row) in enumerate(zip(runners, rows)):
            _retrieval(runner, row, inputs, tokenizer, settings, progress)
            _perplexity_and_agreement(runner, row, inputs, settings, progress)
            if on_method is not None and length_index * len(methods) + method_index + 1 < steps:
                measured = [i for i, measured_row in enumerate(rows) if measured_row.perplexity]
                on_method({**_report(model, model_name, methods, settings, [runners[i] for i in measured],
                                     [rows[i] for i in measured], device), "partial": True})
    return _report(model, model_name, methods, settings, runners, rows, device)


def _report(model, model_name, methods, settings, runners, rows, device) -> dict:
    """The JSON-ready report of `rows` as measured so far (bytes per token at the last length run)."""
    for runner, row in zip(runners, rows):
        (row.k_bytes_per_token, row.v_bytes_per_token), row.bytes_measured_at = runner.bytes_per_token, runner.length
        row.capacity_bytes_per_token = runner.capacity_bytes_per_token
        if runner.compiled is not None:
            # windowed plans cost more per token at short lengths: compare at the measured length
            k_bytes, v_bytes = runner.method.plan.kv_nbytes(runner.compiled.shape, runner.compiled.dtype, 1, runner.length)
            row.k_bytes_per_token_formula = k_bytes / runner.length
            row.v_bytes_per_token_formula = v_bytes / runner.length
    return {
        "model": model_name or model.config.name_or_path,
        "settings": asdict(settings),
        "plans": {m.name: None if m.plan is None else {"fingerprint": m.plan.fingerprint(), "meta": dict(m.plan.meta)}
                  for m in methods},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "device": str(device)},
        "rows": [asdict(row) for row in rows],
    }


@dataclass
class _Prefill:
    """The dense model after a prompt: its last logits (B, V) and its cache."""

    last_logits: torch.Tensor
    cache: DynamicCache


class _LengthInputs:
    """The inputs of one length (retrieval prompts, perplexity windows) and the dense model's
    prefills of them and greedy continuations, each computed when a row first asks and kept for
    the others."""

    def __init__(self, model, tokenizer, settings: EvalSettings, length: int, device):
        self.model, self.settings, self.length, self.device = model, settings, length, device
        self.samples = [s for task in settings.tasks
                        for s in tasks.make_samples(task, tokenizer, length, settings.samples, settings.seed)]
        self.windows = text.token_windows(tokenizer, text.evaluation_text(), length=length, count=settings.ppl_windows,
                                          seed=settings.seed).to(device)
        self._prefills, self._greedy = {}, {}

    def prefill(self, key, prompt: torch.Tensor) -> _Prefill:
        """The dense prefill of `prompt`, computed once per `key` (the input it is)."""
        if key not in self._prefills:
            self._prefills[key] = _dense_prefill(self.model, prompt)
        return self._prefills[key]

    def dense_greedy(self, window: int, prompt: torch.Tensor) -> torch.Tensor:
        """The dense model's greedy tokens (1, agreement_tokens) after perplexity window `window`'s `prompt`."""
        if window not in self._greedy:
            self._greedy[window] = _dense_greedy(self.model, self.prefill(("window", window), prompt),
                                                 self.settings.agreement_tokens)
        return self._greedy[window]


@torch.no_grad()
def _dense_prefill(model, prompt: torch.Tensor) -> _Prefill:
    # Only the last position's logits are used: the others cost a vocabulary-sized matmul per token
    # (a large share of a small model's prefill) and a (tokens, vocabulary) tensor.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(prompt, use_cache=True, **last_only)
    return _Prefill(out.logits[:, -1], getattr(out, CACHE_NAME))


class _Runner:
    """Decodes one method from a prefill, sharing the dense prefill when the plan allows."""

    def __init__(self, model, method: Method, program):
        self.model, self.method = model, method
        self.compiled: TransformedModel | None = (
            None if method.plan is None else transform(model, method.plan, program=program)
        )
        self.bytes_per_token, self.capacity_bytes_per_token, self.length = (0.0, 0.0), 0.0, 0

    @torch.no_grad()
    def continue_from(self, prompt: torch.Tensor, dense: _Prefill) -> tuple[torch.Tensor, object]:
        """(last logits of the prompt, this method's cache) from the shared dense prefill `dense`."""
        if self.compiled is None:
            return dense.last_logits, _copy(dense.cache)
        if self.compiled.cache_encoder is not None:
            layers = dense.cache.layers
            cache = self.compiled.encode_dense_cache([l.keys for l in layers], [l.values for l in layers])
            return dense.last_logits, cache
        out = self.compiled(prompt)
        return out.logits[:, -1], getattr(out, CACHE_NAME)

    @torch.no_grad()
    def step(self, token: torch.Tensor, cache):
        """Logits (B, V) after one more token; records the cache's bytes per token."""
        runner = self.compiled if self.compiled is not None else self.model
        out = runner(token, use_cache=True, **{CACHE_NAME: cache})
        cache = getattr(out, CACHE_NAME)
        self.bytes_per_token = kv_bytes_per_token(cache)
        self.length = cache.get_seq_length()
        allocated = cache.capacity_nbytes if isinstance(cache, CompressedKVCache) else sum(self.bytes_per_token) * self.length
        self.capacity_bytes_per_token = allocated / (self.length * _batch_size(cache))
        return out.logits[:, -1], getattr(out, CACHE_NAME)


@torch.no_grad()
def _retrieval(runner: _Runner, row: Row, inputs: _LengthInputs, tokenizer, settings: EvalSettings, progress: bool):
    outcomes = {task: [] for task in settings.tasks}  # per prompt, in order: 1 answered, 0 not
    for index, sample in enumerate(tqdm(inputs.samples, desc=f"{row.name}: retrieval @{inputs.length}", unit="prompt",
                                        disable=not progress or not inputs.samples)):
        prompt = sample.prompt_ids.to(inputs.device)
        logits, cache = runner.continue_from(prompt, inputs.prefill(("retrieval", index), prompt))
        generated = []
        for _ in range(sample.max_new_tokens):
            token = logits.argmax(dim=-1, keepdim=True)
            generated.append(token)
            if token.item() == tokenizer.eos_token_id:
                break
            logits, cache = runner.step(token, cache)
        answer = tokenizer.decode(torch.cat(generated, dim=1)[0], skip_special_tokens=True)
        outcomes[sample.task].append(int(tasks.score(sample, answer)))
    for task, answered in outcomes.items():
        hits = sum(answered)
        row.accuracy[f"{task}@{inputs.length}"] = {
            "correct": hits,
            "samples": settings.samples,
            "accuracy": hits / settings.samples,
            "ci95": wilson_interval(hits, settings.samples),
            "outcomes": answered,
        }


@torch.no_grad()
def _perplexity_and_agreement(runner: _Runner, row: Row, inputs: _LengthInputs, settings: EvalSettings, progress: bool):
    scored = settings.score_last
    nll, agree = 0.0, 0
    for index, window in enumerate(tqdm(inputs.windows, desc=f"{row.name}: perplexity @{inputs.length}",
                                        unit="window", disable=not progress)):
        prompt, targets = window[None, :-scored], window[None, -scored:]
        dense = inputs.prefill(("window", index), prompt)
        greedy = inputs.dense_greedy(index, prompt)
        nll += _teacher_forced(runner, prompt, dense, targets, lambda lp, t: -lp.gather(-1, t[:, None]).sum().item())
        agree += _teacher_forced(runner, prompt, dense, greedy, lambda lp, t: int(lp.argmax(-1).eq(t).sum()))
    row.perplexity[str(inputs.length)] = math.exp(nll / (len(inputs.windows) * scored))
    row.agreement[str(inputs.length)] = agree / (len(inputs.windows) * settings.agreement_tokens)


def _teacher_forced(runner, prompt, dense: _Prefill, targets, measure) -> float:
    """Sum of `measure(log_probs, target)` over `targets` (1, n), fed one decode step each."""
    logits, cache = runner.continue_from(prompt, dense)
    total = 0
    for i in range(targets.shape[1]):
        total += measure(logits.float().log_softmax(-1), targets[:, i])
        if i + 1 < targets.shape[1]:
            logits, cache = runner.step(targets[:, i : i + 1], cache)
    return total


def _copy(cache: DynamicCache) -> DynamicCache:
    """A cache of its own over the same tensors (decoding replaces tensors, it never writes into them)."""
    copy = DynamicCache()
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys, layer.values, i)
    return copy


@torch.no_grad()
def _dense_greedy(model, dense: _Prefill, count: int) -> torch.Tensor:
    cache = _copy(dense.cache)
    logits, tokens = dense.last_logits, []
    for _ in range(count):
        tokens.append(logits.argmax(-1, keepdim=True))
        out = model(tokens[-1], use_cache=True, **{CACHE_NAME: cache})
        logits, cache = out.logits[:, -1], getattr(out, CACHE_NAME)
    return torch.cat(tokens, dim=1)


def kv_bytes_per_token(cache) -> tuple[float, float]:
    """(K, V) bytes the cache holds per token of one sequence: a CompressedKVCache or a transformers cache."""
    if isinstance(cache, CompressedKVCache):
        k_bytes, v_bytes = cache.k_nbytes, cache.v_nbytes
    else:
        k_bytes = sum(layer.keys.nbytes for layer in cache.layers)
        v_bytes = sum(layer.values.nbytes for layer in cache.layers)
    tokens = _batch_size(cache) * cache.get_seq_length()
    return k_bytes / tokens, v_bytes / tokens


def _batch_size(cache) -> int:
    return cache.batch_size if isinstance(cache, CompressedKVCache) else cache.layers[0].keys.shape[0]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0/n and n/n, unlike ±2σ)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_comparison(baseline: list[int], other: list[int]) -> tuple[int, int, float]:
    """Two methods' outcomes on the same prompts: how many only `baseline` answered, how many only
    `other` did, and the exact two-sided McNemar p-value of a difference that large (the prompts
    both or neither answered say nothing about which is better)."""
    if len(baseline) != len(other):
        raise ValueError(f"paired outcomes need the same prompts: {len(baseline)} against {len(other)}")
    only_baseline = sum(b and not o for b, o in zip(baseline, other))
    only_other = sum(o and not b for b, o in zip(baseline, other))
    discordant = only_baseline + only_other
    tail = sum(math.comb(discordant, k) for k in range(min(only_baseline, only_other) + 1)) / 2 ** discordant
    return only_baseline, only_other, min(1.0, 2 * tail)


# -- presentation ------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """The report as a text table, one line per row; "-" where a row is not measured yet (a partial
    report's later rows lack the length being measured)."""
    rows = report["rows"]
    accuracy_keys = list(rows[0]["accuracy"])  # the first row is measured first at every length: it has every key
    lengths = list(rows[0]["perplexity"])
    header = ["method"] + [cell_label(k) for k in accuracy_keys] + [f"ppl@{length_label(n)}" for n in lengths] \
        + [f"agree@{length_label(n)}" for n in lengths] + ["K B/tok", "V B/tok", "KV vs dense"]
    dense_bytes = rows[0]["k_bytes_per_token"] + rows[0]["v_bytes_per_token"]
    body = []
    for row in rows:
        cells = [row["name"]]
        for key in accuracy_keys:
            cell = row["accuracy"].get(key)
            cells.append("-" if cell is None else
                         f"{cell['correct']}/{cell['samples']} [{cell['ci95'][0]:.0%},{cell['ci95'][1]:.0%}]"
                         + _paired_label(rows[0]["accuracy"][key], cell, row is rows[0]))
        cells += [_number(row["perplexity"].get(n), ".2f") for n in lengths]
        cells += [_number(row["agreement"].get(n), ".3f") for n in lengths]
        kv = row["k_bytes_per_token"] + row["v_bytes_per_token"]
        cells += [f"{row['k_bytes_per_token']:.0f}", f"{row['v_bytes_per_token']:.0f}", f"{kv / dense_bytes:.2f}x"]
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + body]
    settings = report["settings"]
    notes = [f"retrieval: correct/samples [95% Wilson interval], {settings['samples']} prompts per cell; -a/+b p: "
             f"prompts only {rows[0]['name']} / only this row answered, exact McNemar p-value"] if accuracy_keys else []
    notes += [f"ppl: last {settings['score_last']} tokens of {settings['ppl_windows']} windows, decoded one step at a time",
              f"agree: share of {settings['agreement_tokens']} dense greedy tokens",
              f"B/tok: K/V bytes held per token at the last step ({rows[0]['bytes_measured_at']} tokens; windows cost "
              "more at short lengths)"]
    return "\n".join(lines + ["; ".join(notes)])


def _paired_label(first: dict, cell: dict, is_first: bool) -> str:
    """" -5/+1 p=0.22": the cell against the first row's on the same prompts (reports written before
    outcomes were kept have none to pair)."""
    if is_first or "outcomes" not in first or "outcomes" not in cell:
        return ""
    only_first, only_this, p_value = paired_comparison(first["outcomes"], cell["outcomes"])
    return f" -{only_first}/+{only_this} p={p_value:.2f}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def length_label(n: str) -> str:
    """"2048" -> "2K"."""
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def cell_label(key: str) -> str:
    """"passkey@2048" -> "passkey@2K"."""
    task, length = key.split("@")
    return f"{task}@{length_label(length)}"


def plot(report: dict, path) -> None:
    """`figure(report)` as a PNG (needs matplotlib), written atomically: a run rewrites it as it goes."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    plt.close(fig)
    write_atomically(Path(path), png.getvalue())


def figure(report: dict):
    """Two panels against KV bytes per token, one marker per method and one legend for both: mean
    retrieval accuracy with its 95% Wilson interval (greedy agreement with dense where no retrieval
    was measured), and perplexity, both at the longest length every row has (where plans differ
    most). Points that share a place stay apart in the legend, not in overprinted labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left_axes, perplexity_axes) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    rows = report["rows"]
    lengths = set.intersection(*(set(row["perplexity"]) for row in rows))
    longest = max(lengths, key=int) if lengths else None
    retrieval = any(row["accuracy"] for row in rows)
    for i, row in enumerate(rows):
        kv = row["k_bytes_per_token"] + row["v_bytes_per_token"]
        style = dict(marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", linestyle="none", markersize=7,
                     label=row["name"])
        if retrieval:
            cells = list(row["accuracy"].values())
            correct, samples = sum(c["correct"] for c in cells), sum(c["samples"] for c in cells)
            accuracy = correct / max(1, samples)
            low, high = wilson_interval(correct, samples)
            left_axes.errorbar(kv, accuracy, yerr=[[accuracy - low], [high - accuracy]], capsize=3, **style)
        else:
            left_axes.plot(kv, row["agreement"][longest] if longest else float("nan"), **style)
        if longest is not None:
            perplexity_axes.plot(kv, row["perplexity"][longest], **style)
    at_longest = f" at {length_label(longest)} tokens" if longest else " (not measured)"
    left_axes.set(xlabel="KV cache bytes per token (K + V, all layers)", ylim=(-0.05, 1.05),
                  ylabel="retrieval accuracy, all tasks and lengths (95% interval)" if retrieval
                  else f"greedy agreement with dense{at_longest}")
    perplexity_axes.set(xlabel="KV cache bytes per token (K + V, all layers)", ylabel=f"perplexity{at_longest}")
    perplexity_axes.set_yscale("log")  # a broken plan's perplexity is orders of magnitude off
    for axes in (left_axes, perplexity_axes):
        axes.grid(alpha=0.3, which="both")
    handles, labels = left_axes.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="method")
    fig.suptitle(report["model"], fontsize=9)
    fig.tight_layout()
    return fig


_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "*")


def with_overrides(settings: EvalSettings, **overrides) -> EvalSettings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
