"""The `kvcompile` command line: `eval`, `calibrate`, `demo`, `importance`, `plans`, `export`, `bench`,
`throughput`, `onnx-latency`.

`kvcompile eval` measures plans against the dense embedded SmolLM2-135M-Instruct on the same
inputs (evaluation/): RULER-style retrieval, perplexity through compressed decode steps, greedy
agreement, K/V bytes per token. With `--sparsity`, it adds the K-channel baselines at that
sparsity: random channels and the static |q|·|k| ranking. `kvcompile demo` is the main job: the
shipped learned plans at 50% and 70% against the static ranking with the same windows, perplexity
and agreement at 2K (minutes on 2 CPU cores); `kvcompile demo --full` is the hour-long one (both
baselines, retrieval, 1K-4K). Tables go to stdout, progress bars to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .benchmarks.throughput import METHODS as THROUGHPUT_METHODS
from .calibration import importance
from .calibration.calibrate import calibrate
from .calibration.heal import DECODE_MODES, heal
from .calibration.recipe import K_METHODS, LeanKTraining, Recipe, RecipeError
from .cache import CacheMismatch
from .capture import CaptureError, capture
from .evaluation import evaluate, text
from .evaluation.methods import BASELINES, evaluation_methods
from . import __version__
from .models import DEFAULT_MODEL_NAME, ModelNotAvailable, load_default_model, load_model, model_max_length
from .passes import PassError, SiteMatchError
from .plan import PROJECTIONS, ModelShape, Plan, PlanError
from .stores import check_replaceable_directory, write_atomically, write_json

# What a user can act on: reported as one line, `kvcompile: error: ...`, without a traceback
# (`kvcompile --debug COMMAND` shows it). OSError: a path that is missing or not writable.
USER_ERRORS = (PlanError, RecipeError, CaptureError, SiteMatchError, PassError, CacheMismatch, OSError)


class SettingsError(ValueError):
    """A command's settings that cannot work, found before any work."""


# `kvcompile demo`'s learned plans; their windows are the static baselines' by default
DEMO_PLANS = ("smollm2-135m-instruct/leank-k50", "smollm2-135m-instruct/leank-k70")
_OUTPUT_SUFFIXES = {"json": "json", "table": "txt", "plot": "png"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.run is _run_eval:
            _complete_evaluation_settings(args)
        _check_settings(args)
        return args.run(args)
    except ModelNotAvailable as err:
        if args.debug:
            raise
        parser.exit(1, f"kvcompile: error: {err}\n")
    except (SettingsError, *USER_ERRORS) as err:
        if args.debug:
            raise
        parser.exit(2, f"kvcompile: error: {err}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompile", description="A compiler for the KV cache of decoder LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"kvcompile {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    evaluation = commands.add_parser("eval", help="measure plans against the dense model on the same inputs")
    _evaluation_options(evaluation, demo=False)
    evaluation.set_defaults(run=_run_eval, run_mode="eval")

    demo = commands.add_parser("demo", help="the main job: the shipped learned K-channel plans at 50%% and 70%% vs the "
                                            "static ranking and dense")
    _evaluation_options(demo, demo=True)
    demo.add_argument("--full", action="store_true",
                      help="the hour-long demo instead: static and random baselines at each --sparsity without windows, "
                           "no learned plans, retrieval and perplexity at 1K, 2K and 4K")
    demo.set_defaults(run=_run_eval, run_mode="demo")

    calib = commands.add_parser("calibrate", help="build a plan from calibration text and save it")
    calib.add_argument("output", type=Path, help="directory to write the plan to")
    _model_options(calib)
    calib.add_argument("--overwrite", action="store_true",
                       help="replace a plan OUTPUT already holds (it is removed when the run starts)")
    calib.add_argument("--kv-group-size", type=_positive_int, help="merge groups of this many KV heads")
    calib.add_argument("--kv-heads-per-group", type=_positive_int, default=1, help="heads each group becomes (default 1)")
    calib.add_argument("--rope", choices=("commute", "post"), default="commute", help="how merged keys meet RoPE")
    calib.add_argument("--merge-layers", type=_positive_or_zero_int, nargs="+", help="layers to merge (default all)")
    calib.add_argument("--merge-method", choices=("svd", "mean-pool"), default="svd")
    calib.add_argument("--k-sparsity", type=_fraction, help="share of post-RoPE key channels to drop")
    calib.add_argument("--align", type=_positive_int, help="kept channels per head are a multiple of this "
                       "(default 32, or head_dim/4 when smaller: 16 for SmolLM2)")
    calib.add_argument("--k-method", choices=K_METHODS, default="static-qk",
                       help="static |q|.|k| ranking, or LeanK's learned masks (train on a GPU)")
    calib.add_argument("--sink", type=_positive_or_zero_int, default=0, help="first tokens that keep every K channel")
    calib.add_argument("--recent", type=_positive_or_zero_int, default=0, help="last tokens that keep every K channel")
    calib.add_argument("--calib-tokens", type=_positive_int, default=8192)
    leank_options = calib.add_argument_group("LeanK training (--k-method leank)")
    defaults = LeanKTraining()
    leank_options.add_argument("--stage1-steps", type=_positive_or_zero_int, default=defaults.stage1_steps)
    leank_options.add_argument("--stage2-steps", type=_positive_int, default=defaults.stage2_steps)
    leank_options.add_argument("--lr", type=_positive_float, default=defaults.lr)
    leank_options.add_argument("--l1", type=_positive_or_zero_float, default=defaults.l1,
                               help="stage-1 penalty on the mean factor")
    leank_options.add_argument("--train-lengths", type=_positive_int, nargs="+", default=list(defaults.lengths),
                               help="prompt lengths, cycled over the steps")
    leank_options.add_argument("--train-tasks", nargs="+", choices=evaluate.tasks.TASKS, default=list(defaults.tasks))
    leank_options.add_argument("--checkpoint", type=Path, help="where training state goes and resumes from, "
                               "healing's in its heal/ (default OUTPUT/checkpoint)")
    _healing_options(calib.add_argument_group("healing: what the plan changes, distilled from the dense model"),
                     prefix="--heal-", steps=None)
    calib.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    calib.add_argument("--no-progress", dest="progress", action="store_false")
    calib.set_defaults(run=_run_calibrate)

    healer = commands.add_parser("heal", help="distill a saved plan's merge maps and projection updates from the dense "
                                              "model, and save the healed plan")
    healer.add_argument("plan", help="the plan to heal: a directory or a built-in name")
    healer.add_argument("output", type=Path, help="directory to write the healed plan to")
    _model_options(healer)
    _healing_options(healer, prefix="--", steps=200)
    healer.add_argument("--checkpoint", type=Path, help="where training state goes and resumes from (default "
                        "OUTPUT/checkpoint)")
    healer.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    healer.add_argument("--no-progress", dest="progress", action="store_false")
    healer.set_defaults(run=_run_heal)

    show = commands.add_parser("importance", help="a learned plan's channel importance: per-layer summary and heatmap")
    show.add_argument("plan", help="a plan directory or a built-in plan name (`kvcompile plans` lists them)")
    show.add_argument("--png", type=Path, metavar="PATH", help="write the layer x head x channel heatmap here")
    show.set_defaults(run=_run_importance)

    export = commands.add_parser("export", help="the default model under a plan as ONNX files onnxruntime runs")
    export.add_argument("output", type=Path, help="folder for prefill.onnx, decode.onnx, weights.bin, plan/ and "
                        "manifest.json (an earlier export there is replaced)")
    _model_options(export)
    export.add_argument("--plan", required=True, metavar="PLAN", help="a plan directory or a built-in plan name")
    export.set_defaults(run=_run_export)

    bench = commands.add_parser("bench", help="decode attention on a LeanK cache vs dense SDPA (CUDA)")
    bench.add_argument("--layers", type=_positive_int, help="benchmark this many of the mask's 32 layers (default all)")
    bench.add_argument("--configs", nargs="+", metavar="BATCHxCONTEXT", type=_batch_context,
                       help="default: 1x32768 1x131072 8x32768 64x32768")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="timed blocks per method (median, min-max)")
    bench.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    bench.set_defaults(run=_run_bench)

    rate = commands.add_parser("throughput", help="decode tokens/s: dense vs transformed vs torch.compile backend")
    rate.add_argument("--model", default="smollm2", metavar="MODEL",
                      help="smollm2 (the embedded model, with --plan), llama-8b-random (a random Llama-3.1-8B-shaped "
                           "model on CUDA under the published LeanK mask's counts), or a transformers model directory "
                           "or .gguf file (with --plan)")
    rate.add_argument("--plan", default="smollm2-135m-instruct/leank-k50", metavar="PLAN",
                      help="for smollm2: a plan directory or a built-in plan name")
    rate.add_argument("--batch", type=_positive_int, nargs="+", default=[8], help="batch sizes (each with each context)")
    rate.add_argument("--context", type=_positive_int, nargs="+", default=[8192], help="cached tokens before decoding")
    rate.add_argument("--steps", type=_positive_int, default=20, help="decode steps per timed block")
    rate.add_argument("--warmup", type=_positive_int, default=20,
                      help="untimed decode steps first, per method (then more until two blocks agree)")
    rate.add_argument("--repeats", type=_positive_int, default=3, help="timed blocks per method (median, min-max)")
    rate.add_argument("--methods", nargs="+", choices=THROUGHPUT_METHODS, default=list(THROUGHPUT_METHODS),
                      help="rows to run (default all; see kvcompile/benchmarks/throughput.py)")
    rate.add_argument("--layers", type=_positive_int, help="llama-8b-random: this many layers (default 32)")
    rate.add_argument("--json", type=Path, metavar="PATH",
                      help="write the results here, after every method (an interrupted run keeps what it measured)")
    rate.set_defaults(run=_run_throughput)

    latency = commands.add_parser("onnx-latency", help="onnxruntime CPU decode step: dense export vs compressed exports")
    _model_options(latency)
    latency.add_argument("--plans", nargs="+", metavar="PLAN",
                         default=["smollm2-135m-instruct/leank-k50", "smollm2-135m-instruct/leank-k70"],
                         help="plan directories or built-in names")
    latency.add_argument("--contexts", nargs="+", type=_positive_int, default=[2048, 8192])
    latency.add_argument("--reps", type=_positive_int, default=20,
                         help="timed steps per variant and context, after one untimed (median, min-max)")
    latency.add_argument("--threads", type=_positive_int, default=1,
                         help="onnxruntime intra-op threads per session (see kvcompile/benchmarks/onnx_latency.py)")
    latency.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    latency.set_defaults(run=_run_onnx_latency)

    builtin = commands.add_parser("plans", help="list the plans shipped with kvcompile")
    builtin.set_defaults(run=_run_plans)
    for command in commands.choices.values():
        command.formatter_class = _HelpWithDefaults
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, metavar="PATH",
                        help=f"a transformers model directory or a .gguf file (default: the embedded {DEFAULT_MODEL_NAME})")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="weights and cache dtype (default float32)")


def _healing_options(parser, prefix: str, steps: int | None) -> None:
    """heal()'s settings, as `kvcompile heal` names them (--steps, ...) and `calibrate` (--heal-steps, ...)."""
    parser.add_argument(f"{prefix}steps", dest="heal_steps", metavar="N", type=_positive_int, default=steps,
                        help="AdamW steps" + (f" (default {steps})" if steps else " (default: no healing; train on a GPU)"))
    parser.add_argument(f"{prefix}lr", dest="heal_lr", metavar="LR", type=_positive_float, default=1e-3, help="(default 1e-3)")
    parser.add_argument(f"{prefix}rank", dest="heal_rank", metavar="R", type=_positive_or_zero_int, default=16,
                        help="rank of the projection updates of the layers the plan touches; 0: merge maps only "
                             "(default 16)")
    parser.add_argument(f"{prefix}batch-size", dest="heal_batch_size", metavar="N", type=_positive_int, default=8,
                        help="chunks of calibration text a step (default 8)")
    parser.add_argument(f"{prefix}chunk-tokens", dest="heal_chunk_tokens", metavar="TOKENS", type=_positive_int,
                        help="tokens a chunk (a plan that prunes K channels decodes its second half; default 512, or "
                             "4 x (sink + recent + buffer) for a windowed one)")
    parser.add_argument(f"{prefix}seed", dest="heal_seed", metavar="SEED", type=_positive_or_zero_int, default=0,
                        help="the order of the text's chunks and the updates' start (default 0)")
    parser.add_argument(f"{prefix}tasks", dest="heal_tasks", metavar="TASK", nargs="+", default=[],
                        choices=evaluate.tasks.TASKS, help="also distill on retrieval prompts of these tasks, scored "
                        f"at their answers ({', '.join(evaluate.tasks.TASKS)}; default none)")
    parser.add_argument(f"{prefix}task-share", dest="heal_task_share", metavar="SHARE", type=_fraction, default=0.25,
                        help="share of the chunks that are retrieval prompts, with tasks (default 0.25)")
    parser.add_argument(f"{prefix}projections", dest="heal_projections", metavar="NAME", nargs="+",
                        default=list(PROJECTIONS), choices=PROJECTIONS,
                        help=f"the attention projections that get updates (default all: {' '.join(PROJECTIONS)})")
    parser.add_argument(f"{prefix}decode", dest="heal_decode", choices=DECODE_MODES, default="call",
                        help="a windowed K-channel plan's chunks decode their second half as one call, or as "
                             "one-token steps as generation does (default call)")


def _heal(args: argparse.Namespace, model, tokenizer, plan: Plan, checkpoint: Path) -> Plan:
    return heal(model, plan, [text.calibration_text()], tokenizer=tokenizer, steps=args.heal_steps, lr=args.heal_lr,
                rank=args.heal_rank, batch_size=args.heal_batch_size, chunk_tokens=args.heal_chunk_tokens,
                seed=args.heal_seed, tasks=args.heal_tasks, task_share=args.heal_task_share,
                projections=args.heal_projections, decode=args.heal_decode, checkpoint_dir=checkpoint,
                progress=args.progress)


def _evaluation_options(parser: argparse.ArgumentParser, demo: bool) -> None:
    """The options of `eval`, and of `demo` with the demo's defaults (its rows, and output files)."""
    _model_options(parser)
    default_sparsities = [0.5, 0.7] if demo else []
    parser.add_argument("--plan", action="append", metavar="PLAN",
                        help="add the row of a saved plan: a directory or a built-in name (repeatable)" +
                        (f"; default {' and '.join(DEMO_PLANS)} (--plan replaces them), none with --full" if demo else ""))
    parser.add_argument("--windows", type=_positive_or_zero_int, nargs=2, metavar=("SINK", "RECENT"),
                        help="also run every K-channel plan with these full-channel windows (and plans that have "
                             "windows also without)")
    parser.add_argument("--sparsity", type=_fraction, nargs="*", default=default_sparsities,
                        help="K sparsities for the random and static baselines" +
                        (f" (default {' '.join(map(str, default_sparsities))})" if default_sparsities else ""))
    parser.add_argument("--baselines", nargs="*", choices=BASELINES,
                        help="K-channel baselines run at each --sparsity (default " +
                        ("static, both with --full)" if demo else "both)"))
    parser.add_argument("--baseline-windows", type=_positive_or_zero_int, nargs=2, metavar=("SINK", "RECENT"),
                        help="the baselines keep all K channels of the first SINK and last RECENT tokens (default: "
                             "the windows the plans share, 64 256 for the shipped ones; 0 0 without plans)")
    parser.add_argument("--align", type=_positive_int, default=16, help="baselines keep a multiple of this per head (default 16)")
    parser.add_argument("--calib-tokens", type=_positive_int, help="calibration tokens for the static baseline (default 8192" +
                        ("" if demo else ", 2048 with --quick") + ")")
    if not demo:
        parser.add_argument("--quick", action="store_true", help="the short setting (one length, two tasks, few samples)")
    parser.add_argument("--lengths", type=_positive_int, nargs="+",
                        help="context lengths (default " + ("2048; 1024 2048 4096 with --full)" if demo else "1024 2048 4096)"))
    parser.add_argument("--tasks", nargs="*", choices=evaluate.tasks.TASKS,
                        help="retrieval tasks (default " + ("none; all with --full)" if demo else "all)"))
    parser.add_argument("--samples", type=_positive_int, help="retrieval prompts per task and length (default 4)")
    parser.add_argument("--ppl-windows", type=_positive_int, help="perplexity windows per length (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    outputs = (("json", "write every number and the configuration here"),
               ("table", "write the table here as text"),
               ("plot", "PNG of accuracy (or agreement) and perplexity against KV memory"))
    for option, what in outputs:
        default = Path(f"kvcompile-demo.{_OUTPUT_SUFFIXES[option]}") if demo else None
        parser.add_argument(f"--{option}", type=Path, metavar="PATH", default=default,
                            help=what + (f" (default {default})" if default else "") + "; rewritten after each row")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _run_eval(args: argparse.Namespace) -> int:
    settings = _evaluation_settings(args)
    plans = [(Path(spec).name, Plan.load_path_or_builtin(spec)) for spec in args.plan]  # fail on a bad plan before loading the model
    baseline_windows = tuple(args.baseline_windows or _shared_windows(plans))
    start = time.perf_counter()
    with _cpu_threads(args.device):
        model, tokenizer = _load(args)
        model = model.to(args.device)
        program = capture(model)  # traced once, compiled for every row
        methods = evaluation_methods(
            model, tokenizer, sparsities=args.sparsity, baselines=args.baselines, align=args.align,
            calib_tokens=args.calib_tokens, baseline_windows=baseline_windows, plans=plans,
            windows=args.windows and tuple(args.windows), program=program, progress=args.progress,
        )
        name = DEFAULT_MODEL_NAME if args.model is None else str(args.model)
        # the outputs are rewritten after every row: an interrupted run keeps the rows it finished
        report = evaluate.evaluate(
            model, tokenizer, methods, settings, model_name=name, progress=args.progress, program=program,
            on_method=lambda partial: _write_outputs(args, {**partial, "seconds": _seconds_since(start)}),
        )
    report["seconds"] = _seconds_since(start)
    print(evaluate.format_table(report))
    print(f"{report['model']} on {report['versions']['device']}, {report['seconds']} s")
    for path in _write_outputs(args, report):
        print(f"wrote {path}")
    return 0


def _complete_evaluation_settings(args: argparse.Namespace) -> None:
    """Fill in the eval and demo defaults that depend on other options (`demo --full`, `--quick`)."""
    default_demo = args.run_mode == "demo" and not args.full
    if args.plan is None:
        if default_demo and args.model is not None:
            raise SettingsError(f"--model {args.model}: the demo's plans ({', '.join(DEMO_PLANS)}) are "
                                f"{DEFAULT_MODEL_NAME}'s; pass --plan for this model, or --full")
        args.plan = list(DEMO_PLANS) if default_demo else []
    if args.baselines is None:
        args.baselines = ["static"] if default_demo else list(BASELINES)
    if args.calib_tokens is None:
        args.calib_tokens = 2048 if getattr(args, "quick", False) else 8192


def _evaluation_settings(args: argparse.Namespace) -> evaluate.EvalSettings:
    if args.run_mode == "demo":
        settings = evaluate.EvalSettings() if args.full else evaluate.DEMO
    else:
        settings = evaluate.QUICK if args.quick else evaluate.EvalSettings()
    return evaluate.with_overrides(settings, lengths=args.lengths and tuple(args.lengths),
                                   tasks=None if args.tasks is None else tuple(args.tasks), samples=args.samples,
                                   ppl_windows=args.ppl_windows)


def _shared_windows(plans: list[tuple[str, Plan]]) -> tuple[int, int]:
    """The (sink, recent) windows every plan has ((0, 0) without plans): the baselines' default."""
    windows = {(plan.sink, plan.recent) for _, plan in plans}
    if len(windows) > 1:
        listed = ", ".join(f"{name} {plan.sink} {plan.recent}" for name, plan in plans)
        raise SettingsError(f"the plans have different windows ({listed}): pass --baseline-windows SINK RECENT")
    return windows.pop() if windows else (0, 0)


def _write_outputs(args: argparse.Namespace, report: dict) -> list[Path]:
    """The report as --json, --table and --plot, each file replaced whole (a reader never sees a
    part); the paths written."""
    written = []
    if args.json is not None:
        write_json(args.json, report)
        written.append(args.json)
    if args.table is not None:
        write_atomically(args.table, (evaluate.format_table(report) + "\n").encode())
        written.append(args.table)
    if args.plot is not None:
        evaluate.plot(report, args.plot)
        written.append(args.plot)
    return written


@contextmanager
def _cpu_threads(device: str) -> Iterator[None]:
    """On CPU, torch runs one thread fewer than there are cores while the block runs (measured:
    see the README's main job), unless OMP_NUM_THREADS says how many; the old count afterwards."""
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, cores - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seconds_since(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def _run_calibrate(args: argparse.Namespace) -> int:
    training = LeanKTraining(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, lr=args.lr, l1=args.l1,
                             lengths=tuple(args.train_lengths), tasks=tuple(args.train_tasks))
    recipe = Recipe(kv_group_size=args.kv_group_size, kv_heads_per_group=args.kv_heads_per_group, rope=args.rope,
                    merge_layers=args.merge_layers and tuple(args.merge_layers), merge_method=args.merge_method,
                    k_sparsity=args.k_sparsity, align=args.align, k_method=args.k_method, sink=args.sink,
                    recent=args.recent, leank=training, calib_tokens=args.calib_tokens)
    if args.overwrite:  # an interrupted run then leaves no plan, rather than the old one looking like its result
        (args.output / "plan.json").unlink(missing_ok=True)
    start = time.perf_counter()
    model, tokenizer = _load(args)
    model = model.to(args.device)
    checkpoint = args.checkpoint or args.output / "checkpoint"
    plan = calibrate(model, recipe, [text.calibration_text()], tokenizer=tokenizer, progress=args.progress,
                     checkpoint_dir=checkpoint)
    if args.heal_steps is not None:
        plan = _heal(args, model, tokenizer, plan, checkpoint / "heal")
    plan.save(args.output)
    print(f"wrote plan {plan.fingerprint()} to {args.output} ({time.perf_counter() - start:.0f} s on {args.device})",
          file=sys.stderr)
    return 0


def _run_heal(args: argparse.Namespace) -> int:
    plan = Plan.load_path_or_builtin(args.plan)
    start = time.perf_counter()
    model, tokenizer = _load(args)
    healed = _heal(args, model.to(args.device), tokenizer, plan, args.checkpoint or args.output / "checkpoint")
    healed.save(args.output)
    record = healed.meta["heal"]
    print(f"wrote plan {healed.fingerprint()} (healed from {plan.fingerprint()}, KL {record['initial_loss']:.4f} -> "
          f"{record['final_loss']:.4f}) to {args.output} ({time.perf_counter() - start:.0f} s on {args.device})",
          file=sys.stderr)
    return 0


def _run_importance(args: argparse.Namespace) -> int:
    plan = Plan.load_path_or_builtin(args.plan)
    print(importance.summary(plan))
    if args.png is not None:
        print(f"wrote {importance.plot(plan, args.png, title=f'{args.plan}: learned K-channel importance')}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from .export.onnx import OnnxExportError, export_onnx
    from .export.onnx_runtime import MANIFEST

    plan = Plan.load_path_or_builtin(args.plan)
    try:
        check_replaceable_directory(args.output, MANIFEST)  # before the model loads
    except FileExistsError as err:
        raise SettingsError(f"OUTPUT {err}") from err
    model, _ = _load(args)
    try:
        folder = export_onnx(model, plan, args.output)
    except OnnxExportError as err:
        print(f"kvcompile export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(sorted(path.name for path in folder.iterdir()))} to {folder}")
    return 0


def _print_report(table: str, report: dict, json_path: Path | None) -> int:
    """A measuring command's ending: its table on stdout, its report as JSON where asked."""
    print(table)
    if json_path is not None:
        write_json(json_path, report)
        print(f"wrote {json_path}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from .benchmarks import bench

    if not torch.cuda.is_available():
        print("kvcompile bench: error: the decode benchmark needs a CUDA device", file=sys.stderr)
        return 1
    report = bench.run(configs=args.configs or bench.CONFIGS, layers=args.layers, repeats=args.repeats)
    return _print_report(bench.format_table(report), report, args.json)


def _run_throughput(args: argparse.Namespace) -> int:
    from .benchmarks import throughput

    if args.model == "llama-8b-random":
        if not torch.cuda.is_available():
            print("kvcompile throughput: error: the 8B-shaped model needs a CUDA device", file=sys.stderr)
            return 1
        model = throughput.llama_8b_shaped(num_layers=args.layers or 32)
        plan = throughput.leank_mask_plan(ModelShape.from_config(model.config))
    else:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model, _ = load_default_model(dtype) if args.model == "smollm2" else load_model(args.model, dtype)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        plan = Plan.load_path_or_builtin(args.plan)
    shapes = [(batch, context) for batch in args.batch for context in args.context]
    reports: list[dict] = []

    def save_so_far(current: dict) -> None:  # an interrupted run keeps every method measured
        if args.json is not None:
            so_far = [*reports, current]
            write_json(args.json, so_far[0] if len(shapes) == 1 else so_far)

    for batch, context in shapes:
        reports.append(throughput.run(model, plan, batch, context, steps=args.steps, warmup=args.warmup,
                                      repeats=args.repeats, methods=tuple(args.methods), on_method=save_so_far))
    table = "\n".join(throughput.format_row(report) for report in reports)
    return _print_report(table, reports[0] if len(reports) == 1 else reports, args.json)


def _run_onnx_latency(args: argparse.Namespace) -> int:
    from .benchmarks import onnx_latency

    model, _ = _load(args)
    plans = {Path(spec).name: Plan.load_path_or_builtin(spec) for spec in args.plans}
    report = onnx_latency.run(model, plans, tuple(args.contexts), reps=args.reps, threads=args.threads)
    return _print_report(onnx_latency.format_table(report), report, args.json)


def _run_plans(args: argparse.Namespace) -> int:
    for name in Plan.list_builtin():
        print(f"{name}  {_describe(Plan.load_builtin(name))}")
    return 0


def _describe(plan: Plan) -> str:
    """What a plan does, in a few words: K sparsity and windows, merges, healing."""
    parts = []
    if plan.k_channels:
        parts.append(f"{plan.meta.get('method', '?')}, {plan.meta.get('sparsity', 0):.0%} K sparsity")
        if plan.windowed:
            parts.append(f"windows {plan.sink}/{plan.recent}")
    if plan.merges:
        merge = next(iter(plan.merges.values()))
        parts.append(f"{merge.rope} merge of KV heads {merge.group_size} -> {merge.heads_per_group} in "
                     f"{len(plan.merges)} layers")
    if "heal" in plan.meta:
        record = plan.meta["heal"]
        recipe = f", {record['task_share']:.0%} retrieval prompts ({' '.join(record['tasks'])})" if record.get("tasks") else ""
        projections = record.get("projections", PROJECTIONS)
        if record.get("rank") and set(projections) != set(PROJECTIONS):
            recipe += f", updates of {' '.join(projections)}"
        if record.get("decode", "call") != "call":
            recipe += f", decoded in {record['decode']}"
        parts.append(f"healed ({record['steps']} steps{recipe}, KL {record['initial_loss']:.3f} -> "
                     f"{record['final_loss']:.3f})")
    return ", ".join(parts)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default where it has one and the help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        takes_value = action.nargs != 0  # a flag's default is its absence
        if takes_value and action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _load(args: argparse.Namespace):
    """(model, tokenizer) of `--model` (the embedded model by default) in `--dtype`."""
    dtype = _DTYPES[args.dtype]
    return load_default_model(dtype) if args.model is None else load_model(args.model, dtype)


def _check_settings(args: argparse.Namespace) -> None:
    """Every setting a command can check without a model: SettingsError naming the option, before
    any model is loaded or any work done."""
    device = getattr(args, "device", None)
    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError as err:
            raise SettingsError(f"--device {device}: not a device ({err})") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise SettingsError(f"--device {device}: no CUDA device is available (use --device cpu)")
    model = getattr(args, "model", None)
    if isinstance(model, Path) and not model.exists():
        raise SettingsError(f"--model {model}: no such directory or file")
    if args.run is _run_calibrate and args.heal_steps and args.heal_rank == 0 and args.kv_group_size is None:
        raise SettingsError("--heal-rank 0: healing a plan that merges no heads trains only the projection updates; "
                            "give a rank >= 1 or add --kv-group-size")
    lengths = getattr(args, "lengths", None) or ()
    limit = model_max_length(model) if lengths else None
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long:
        raise SettingsError(f"--lengths {' '.join(map(str, too_long))}: longer than the model's context ({limit} tokens)")
    for option in ("json", "table", "plot", "png"):
        path = getattr(args, option, None)
        if path is not None:
            _check_writable(path, f"--{option}", folder=False)
    if args.run is _run_calibrate:
        _check_writable(args.output, "OUTPUT", folder=True)
        if (args.output / "plan.json").exists() and not args.overwrite:
            raise SettingsError(f"{args.output} already holds a plan: pass --overwrite to replace it, or another OUTPUT")
    if args.run is _run_export:
        _check_writable(args.output, "OUTPUT", folder=True)


def _check_writable(path: Path, option: str, folder: bool) -> None:
    """`path` can be written: a folder (created if missing) or a file in an existing folder."""
    if path.exists() and path.is_dir() != folder:
        raise SettingsError(f"{option} {path}: {'not a folder' if folder else 'is a folder'}")
    parent = path if folder else path.parent
    while folder and not parent.exists():  # a folder is created with its parents: check the first that exists
        parent = parent.parent
    if not parent.is_dir():
        raise SettingsError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SettingsError(f"{option} {path}: folder {parent} is not writable")


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return int(value)


def _positive_or_zero_int(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return int(value)


def _batch_context(value: str) -> tuple[int, int]:
    batch, _, context = value.partition("x")
    if not (batch.isdigit() and context.isdigit() and int(batch) > 0 and int(context) > 0):
        raise argparse.ArgumentTypeError(f"expected BATCHxCONTEXT such as 8x32768, got {value}")
    return int(batch), int(context)


def _positive_float(value: str) -> float:
    number = _finite_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _positive_or_zero_float(value: str) -> float:
    number = _finite_float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def _fraction(value: str) -> float:
    message = f"must be in [0, 1), got {value}"
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(message)
    return number
