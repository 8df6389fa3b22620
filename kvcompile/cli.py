"""The `kvcompile` command line. Subcommands: `demo`.

`kvcompile demo` calibrates a static K-channel plan for the embedded SmolLM2-135M-Instruct, compiles
it, and prints dense against compressed: perplexity and greedy agreement on held-out text, and the
K/V bytes per token the caches really hold. Tables go to stdout, progress bars to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from . import metrics, text
from .calibrate import RecipeError, static_k_plan
from .models import DEFAULT_MODEL_NAME, ModelNotAvailable, load_default_model
from .runtime import transform

# Defaults of the sized options: a full demo (a few minutes on a 2-core CPU) and --quick.
FULL_RUN = dict(calib_tokens=4096, context=512, score_last=64, windows=4, new_tokens=32)
QUICK_RUN = dict(calib_tokens=1024, context=128, score_last=16, windows=2, new_tokens=8)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return args.run(parser, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompile", description="A compiler for the KV cache of decoder LLMs.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="calibrate, compile and evaluate a K-channel plan for the embedded SmolLM2-135M-Instruct",
        description="Calibrate a static K-channel plan for SmolLM2-135M-Instruct, compile it, and compare it "
        "with the dense model on held-out text: perplexity, greedy agreement, K/V bytes per token.",
    )
    demo.add_argument("--sparsity", type=_sparsity, default=0.5, help="share of key channels to drop (default 0.5)")
    demo.add_argument("--align", type=_positive_int, default=16, help="kept channels per head are a multiple of this (default 16)")
    sized = "default {full}, {quick} with --quick"
    for name, unit in (
        ("calib_tokens", "calibration tokens (rounded up to whole --context chunks)"),
        ("context", "tokens per evaluation window"),
        ("score_last", "scored tokens at the end of each window, fed one decode step at a time"),
        ("windows", "evaluation windows (also the prompts for greedy agreement)"),
        ("new_tokens", "greedy tokens per prompt for agreement"),
    ):
        demo.add_argument(
            "--" + name.replace("_", "-"),
            type=_positive_int,
            help=f"{unit}; " + sized.format(full=FULL_RUN[name], quick=QUICK_RUN[name]),
        )
    demo.add_argument("--quick", action="store_true", help="a much shorter run, for a smoke test")
    demo.add_argument("--seed", type=int, default=0, help="seed of the choice of text windows (default 0)")
    demo.add_argument("--json", type=Path, metavar="PATH", help="also write every number and the configuration here")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    demo.set_defaults(run=_run_demo)
    return parser


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return int(value)


def _sparsity(value: str) -> float:
    # static_k_plan checks the range too, but only after the model has loaded
    message = f"must be in [0, 1), got {value}"
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(message)
    return number


def _demo_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The options as one dict, sized options filled from the full or quick preset."""
    preset = QUICK_RUN if args.quick else FULL_RUN
    config = {name: getattr(args, name) or default for name, default in preset.items()}
    config.update(sparsity=args.sparsity, align=args.align, seed=args.seed, quick=args.quick)
    if config["score_last"] >= config["context"]:
        parser.error(f"--score-last ({config['score_last']}) must be smaller than --context ({config['context']})")
    return config


def _run_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = _demo_config(parser, args)
    try:
        report = run_demo(config, progress=args.progress)
    except RecipeError as err:
        parser.error(str(err))
    except ModelNotAvailable as err:
        parser.exit(1, f"kvcompile: error: {err}\n")
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_demo(config: dict, *, progress: bool = True) -> dict:
    """Every number of the demo, with `config`, as one JSON-ready dict."""
    seconds: dict[str, float] = {}
    with _timed(seconds, "load"):
        model, tokenizer = load_default_model()
    context, windows_count = config["context"], config["windows"]
    calibration = text.token_windows(
        tokenizer, text.calibration_text(), length=context, count=-(-config["calib_tokens"] // context), seed=config["seed"]
    )
    windows = text.token_windows(tokenizer, text.evaluation_text(), length=context, count=windows_count, seed=config["seed"])
    prompts = windows[:, : context - config["score_last"]]

    with _timed(seconds, "calibrate"):
        plan = static_k_plan(model, calibration, sparsity=config["sparsity"], align=config["align"], progress=progress)
    with _timed(seconds, "transform"):
        compressed = transform(model, plan)

    results = {}
    for name, candidate in (("dense", model), ("kvcompile", compressed)):
        with _timed(seconds, f"evaluate_{name}"):
            k_bytes, v_bytes = metrics.kv_bytes_per_token(_decoded_cache(candidate, windows[:1]))
            results[name] = {
                "perplexity": metrics.perplexity(candidate, windows, config["score_last"], progress=progress),
                "k_bytes_per_token": k_bytes,
                "v_bytes_per_token": v_bytes,
            }
    with _timed(seconds, "greedy_agreement"):
        results["kvcompile"]["greedy_agreement"] = metrics.greedy_agreement(
            model, compressed, prompts, config["new_tokens"], progress=progress
        )

    return {
        "model": DEFAULT_MODEL_NAME,
        "config": config,
        "plan": {
            "fingerprint": plan.fingerprint(),
            "meta": dict(plan.meta),
            "kept_k_fraction": metrics.kept_k_fraction(plan, compressed.shape),
            "k_bytes_per_token": plan.k_bytes_per_token(compressed.shape, compressed.dtype),
            "v_bytes_per_token": plan.v_bytes_per_token(compressed.shape, compressed.dtype),
        },
        **results,
        "seconds": seconds,
    }


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 2)


def _decoded_cache(model, tokens: torch.Tensor):
    """The cache after prefilling all but the last token and decoding that one: both phases wrote it."""
    with torch.no_grad():
        out = model(tokens[:, :-1], use_cache=True)
        return model(tokens[:, -1:], past_key_values=out.past_key_values, use_cache=True).past_key_values


def format_report(report: dict) -> str:
    config, plan, dense, compressed = report["config"], report["plan"], report["dense"], report["kvcompile"]
    ppl_change = compressed["perplexity"] / dense["perplexity"] - 1
    rows = [
        ("", "dense", "kvcompile", "plan formula"),
        (
            f"perplexity (last {config['score_last']} of {config['context']} tokens)",
            f"{dense['perplexity']:.3f}",
            f"{compressed['perplexity']:.3f} ({ppl_change:+.1%})",
            "",
        ),
        (
            f"greedy agreement with dense ({config['new_tokens']} tokens)",
            "reference",
            f"{compressed['greedy_agreement']:.3f}",
            "",
        ),
        _bytes_row("K", "k_bytes_per_token", dense, compressed, plan),
        _bytes_row("V", "v_bytes_per_token", dense, compressed, plan),
        ("kept K channels", "100%", f"{plan['kept_k_fraction']:.1%}", ""),
    ]
    title = (
        f"kvcompile demo: {report['model']}, {plan['meta']['method']} plan {plan['fingerprint']} at sparsity "
        f"{config['sparsity']} (align {config['align']}) from {plan['meta']['calibration_tokens']} calibration tokens"
    )
    timings = "seconds: " + ", ".join(f"{name} {value}" for name, value in report["seconds"].items())
    return "\n".join([title, _table(rows), timings])


def _bytes_row(part: str, key: str, dense: dict, compressed: dict, plan: dict) -> tuple[str, ...]:
    return (f"{part} bytes / token", f"{dense[key]:g}", f"{compressed[key]:g}", f"{plan[key]}")


def _table(rows: list[tuple[str, ...]]) -> str:
    """First column left-aligned, the others right-aligned."""
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
