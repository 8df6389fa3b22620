"""Evaluation: a plan's accuracy and memory against the dense model, on the same inputs, in one run.

Rows are methods (dense, baselines, plans); for each context length every row sees the same
RULER-style retrieval prompts (tasks.py), the same perplexity windows and the same agreement
prompts. Every scored token after the prompt goes through a decode step on the row's compressed
cache. Plans that leave the model alone until the cache (K-channel pruning) start from one shared
dense prefill through their compiled cache encoder, which writes exactly what their own prefill
would; plans that merge heads prefill themselves.
"""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field, replace

import torch
import transformers
from tqdm import tqdm
from transformers import DynamicCache

from kvcompile.cache import CompressedKVCache
from kvcompile.plan import Plan
from kvcompile.runtime import TransformedModel, transform

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
             model_name: str = "", progress: bool = True, program=None, on_length=None) -> dict:
    """Every number of the table, with the configuration that produced it, as one JSON-ready dict.

    `program`, from `kvcompile.capture(model)`, is compiled for every plan instead of tracing anew.
    `on_length(report)` is called after each length with the report so far (`"partial": true`,
    `"lengths_done"`), e.g. to save it."""
    max_length = getattr(model.config, "max_position_embeddings", None)
    too_long = [length for length in settings.lengths if max_length is not None and length > max_length]
    if too_long:
        raise ValueError(f"context lengths {too_long} exceed the model's maximum {max_length}")
    runners = [_Runner(model, method, program) for method in methods]
    rows = [Row(m.name, None if m.plan is None else m.plan.fingerprint()) for m in methods]
    device = next(model.parameters()).device
    for done, length in enumerate(settings.lengths, start=1):
        _retrieval(model, tokenizer, runners, rows, settings, length, device, progress)
        _perplexity_and_agreement(model, tokenizer, runners, rows, settings, length, device, progress)
        if on_length is not None and done < len(settings.lengths):
            on_length({**_report(model, model_name, methods, settings, runners, rows, device), "partial": True,
                       "lengths_done": list(settings.lengths[:done])})
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


class _Runner:
    """Decodes one method from a prefill, sharing the dense prefill when the plan allows."""

    def __init__(self, model, method: Method, program):
        self.model, self.method = model, method
        self.compiled: TransformedModel | None = (
            None if method.plan is None else transform(model, method.plan, program=program)
        )
        self.bytes_per_token, self.capacity_bytes_per_token, self.length = (0.0, 0.0), 0.0, 0

    @torch.no_grad()
    def continue_from(self, prompt: torch.Tensor, dense) -> tuple[torch.Tensor, object]:
        """(last logits of the prompt, this method's cache) from the shared dense prefill `dense`."""
        if self.compiled is None:
            return dense.logits[:, -1], _copy(dense.past_key_values)
        if self.compiled.cache_encoder is not None:
            layers = dense.past_key_values.layers
            cache = self.compiled.encode_dense_cache([l.keys for l in layers], [l.values for l in layers])
            return dense.logits[:, -1], cache
        out = self.compiled(prompt)
        return out.logits[:, -1], out.past_key_values

    @torch.no_grad()
    def step(self, token: torch.Tensor, cache):
        """Logits (B, V) after one more token; records the cache's bytes per token."""
        runner = self.compiled if self.compiled is not None else self.model
        out = runner(token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        self.bytes_per_token = kv_bytes_per_token(cache)
        self.length = cache.get_seq_length()
        allocated = cache.capacity_nbytes if isinstance(cache, CompressedKVCache) else sum(self.bytes_per_token) * self.length
        self.capacity_bytes_per_token = allocated / (self.length * _batch_size(cache))
        return out.logits[:, -1], out.past_key_values


@torch.no_grad()
def _retrieval(model, tokenizer, runners, rows, settings, length, device, progress):
    samples = [s for task in settings.tasks for s in tasks.make_samples(task, tokenizer, length, settings.samples, settings.seed)]
    correct = {(row.name, s.task): 0 for row in rows for s in samples}
    for sample in tqdm(samples, desc=f"retrieval @{length}", unit="prompt", disable=not progress):
        prompt = sample.prompt_ids.to(device)
        dense = model(prompt, use_cache=True)
        for runner, row in zip(runners, rows):
            logits, cache = runner.continue_from(prompt, dense)
            generated = []
            for _ in range(sample.max_new_tokens):
                token = logits.argmax(dim=-1, keepdim=True)
                generated.append(token)
                if token.item() == tokenizer.eos_token_id:
                    break
                logits, cache = runner.step(token, cache)
            answer = tokenizer.decode(torch.cat(generated, dim=1)[0], skip_special_tokens=True)
            correct[row.name, sample.task] += tasks.score(sample, answer)
    for row in rows:
        for task in settings.tasks:
            hits = correct[row.name, task]
            row.accuracy[f"{task}@{length}"] = {
                "correct": hits,
                "samples": settings.samples,
                "accuracy": hits / settings.samples,
                "ci95": wilson_interval(hits, settings.samples),
            }


@torch.no_grad()
def _perplexity_and_agreement(model, tokenizer, runners, rows, settings, length, device, progress):
    windows = text.token_windows(tokenizer, text.evaluation_text(), length=length, count=settings.ppl_windows,
                                 seed=settings.seed).to(device)
    scored = settings.score_last
    nll = {row.name: 0.0 for row in rows}
    agree = {row.name: 0 for row in rows}
    for window in tqdm(windows, desc=f"perplexity @{length}", unit="window", disable=not progress):
        prompt, targets = window[None, :-scored], window[None, -scored:]
        dense = model(prompt, use_cache=True)
        greedy = _dense_greedy(model, dense, settings.agreement_tokens)
        for runner, row in zip(runners, rows):
            nll[row.name] += _teacher_forced(runner, prompt, dense, targets, lambda lp, t: -lp.gather(-1, t[:, None]).sum().item())
            agree[row.name] += _teacher_forced(runner, prompt, dense, greedy, lambda lp, t: int(lp.argmax(-1).eq(t).sum()))
    for row in rows:
        row.perplexity[str(length)] = math.exp(nll[row.name] / (len(windows) * scored))
        row.agreement[str(length)] = agree[row.name] / (len(windows) * settings.agreement_tokens)


def _teacher_forced(runner, prompt, dense, targets, measure) -> float:
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


def _dense_greedy(model, dense, count: int) -> torch.Tensor:
    cache = _copy(dense.past_key_values)
    logits, tokens = dense.logits[:, -1], []
    for _ in range(count):
        tokens.append(logits.argmax(-1, keepdim=True))
        out = model(tokens[-1], past_key_values=cache, use_cache=True)
        logits, cache = out.logits[:, -1], out.past_key_values
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


# -- presentation ------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    rows = report["rows"]
    accuracy_keys = list(rows[0]["accuracy"])
    lengths = list(rows[0]["perplexity"])
    header = ["method"] + [cell_label(k) for k in accuracy_keys] + [f"ppl@{length_label(n)}" for n in lengths] \
        + [f"agree@{length_label(n)}" for n in lengths] + ["K B/tok", "V B/tok", "KV vs dense"]
    dense_bytes = rows[0]["k_bytes_per_token"] + rows[0]["v_bytes_per_token"]
    body = []
    for row in rows:
        cells = [row["name"]]
        for key in accuracy_keys:
            cell = row["accuracy"][key]
            low, high = cell["ci95"]
            cells.append(f"{cell['correct']}/{cell['samples']} [{low:.0%},{high:.0%}]")
        cells += [f"{row['perplexity'][n]:.2f}" for n in lengths]
        cells += [f"{row['agreement'][n]:.3f}" for n in lengths]
        kv = row["k_bytes_per_token"] + row["v_bytes_per_token"]
        cells += [f"{row['k_bytes_per_token']:.0f}", f"{row['v_bytes_per_token']:.0f}", f"{kv / dense_bytes:.2f}x"]
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + body]
    samples = rows[0]["accuracy"][accuracy_keys[0]]["samples"] if accuracy_keys else 0
    note = (f"retrieval: correct/samples [95% Wilson interval], {samples} prompts per cell; "
            f"ppl: last {report['settings']['score_last']} tokens of {report['settings']['ppl_windows']} windows, "
            f"decoded one step at a time; agree: share of {report['settings']['agreement_tokens']} dense greedy tokens; "
            f"B/tok: K/V bytes held per token at the last step ({rows[0]['bytes_measured_at']} tokens; windows cost more at short lengths)")
    return "\n".join(lines + [note])


def length_label(n: str) -> str:
    """"2048" -> "2K"."""
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def cell_label(key: str) -> str:
    """"passkey@2048" -> "passkey@2K"."""
    task, length = key.split("@")
    return f"{task}@{length_label(length)}"


def plot(report: dict, path) -> None:
    """`figure(report)` as a PNG (needs matplotlib)."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def figure(report: dict):
    """Two panels against KV bytes per token, one marker per method and one legend for both: mean
    retrieval accuracy with its 95% Wilson interval, and perplexity at the longest length (where
    plans differ most). Points that share a place stay apart in the legend, not in overprinted labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy_axes, perplexity_axes) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    lengths = list(report["rows"][0]["perplexity"])
    longest = max(lengths, key=int) if lengths else None
    for i, row in enumerate(report["rows"]):
        kv = row["k_bytes_per_token"] + row["v_bytes_per_token"]
        cells = list(row["accuracy"].values())
        correct, samples = sum(c["correct"] for c in cells), sum(c["samples"] for c in cells)
        accuracy = correct / max(1, samples)
        low, high = wilson_interval(correct, samples)
        style = dict(marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", linestyle="none", markersize=7,
                     label=row["name"])
        accuracy_axes.errorbar(kv, accuracy, yerr=[[accuracy - low], [high - accuracy]], capsize=3, **style)
        if longest is not None:
            perplexity_axes.plot(kv, row["perplexity"][longest], **style)
    accuracy_axes.set(xlabel="KV cache bytes per token (K + V, all layers)", ylim=(-0.05, 1.05),
                      ylabel="retrieval accuracy, all tasks and lengths (95% interval)")
    perplexity_axes.set(xlabel="KV cache bytes per token (K + V, all layers)",
                        ylabel=f"perplexity at {length_label(longest)} tokens" if longest else "perplexity (not measured)")
    perplexity_axes.set_yscale("log")  # a broken plan's perplexity is orders of magnitude off
    for axes in (accuracy_axes, perplexity_axes):
        axes.grid(alpha=0.3, which="both")
    handles, labels = accuracy_axes.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="method")
    fig.suptitle(report["model"], fontsize=9)
    fig.tight_layout()
    return fig


_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "*")


def with_overrides(settings: EvalSettings, **overrides) -> EvalSettings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
