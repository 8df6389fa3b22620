"""Healing on SmolLM2-135M-Instruct: dense, the unhealed plans and the healed ones, one table.

    python scripts/heal_table.py --out heal/      # a CUDA machine

Plans: commute merges 3 KV heads -> 2 and 3 -> 1 in every layer (SVD start, 16384 calibration
tokens) and the shipped learned `leank-k70` (windows sink 64, recent 256). Each is healed on the
calibration text (`kvcompile.heal`: merge maps and rank-`--rank` projection updates) and saved
under OUT/<name>; then every row is evaluated on the evaluation text (disjoint from the
calibration text) and the report written to OUT/heal.json. A plan already healed under OUT is
loaded instead of healed again (a rerun evaluates what an interrupted one healed).
"""

import argparse
import functools
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import kvcompile
from kvcompile.calibration.heal import DECODE_MODES, default_chunk_tokens
from kvcompile.evaluation import evaluate, text
from kvcompile.models import DEFAULT_MODEL_NAME, load_default_model
from kvcompile.plan import PROJECTIONS

MERGES = {
    "commute 3->2 all": dict(kv_group_size=3, kv_heads_per_group=2, rope="commute"),
    "commute 3->1 all": dict(kv_group_size=3, rope="commute"),
}
SHIPPED = {"leank-k70": "smollm2-135m-instruct/leank-k70"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plans", nargs="+", default=[*MERGES, *SHIPPED], choices=[*MERGES, *SHIPPED])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="chunks of 512 tokens a step (a windowed plan's "
                        "chunks are longer: as many tokens in fewer of them)")
    parser.add_argument("--chunk-tokens", type=int, help="tokens a chunk (default: heal's)")
    parser.add_argument("--heal-tasks", nargs="*", default=[], help="retrieval tasks healing also distills on")
    parser.add_argument("--task-share", type=float, default=0.25, help="share of the chunks that are retrieval prompts")
    parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS,
                        help="the attention projections healing updates")
    parser.add_argument("--decode", choices=DECODE_MODES, default="call",
                        help="how healing decodes a chunk's second half (heal's decode)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--ppl-windows", type=int, default=2, help="perplexity windows per length")
    parser.add_argument("--score-last", type=int, default=32, help="scored tokens at the end of each window")
    parser.add_argument("--compare", nargs="*", default=[], metavar="PLAN",
                        help="more rows: saved plan directories or built-in names (e.g. an earlier healing)")
    parser.add_argument("--tasks", nargs="+", default=["passkey"])
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-decode", action="store_true", help="evaluate each plan's decode step compiled by "
                        "inductor (as transform does by default): same numbers, a compile per plan and length")
    args = parser.parse_args()
    if not args.compile_decode:
        evaluate.transform = functools.partial(kvcompile.transform, compile_decode=False)

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_default_model()
    model = model.to(args.device)
    program = kvcompile.capture(model)
    unhealed, healed = {}, {}
    for name in args.plans:
        if name in MERGES:
            recipe = kvcompile.Recipe(**MERGES[name], calib_tokens=args.calib_tokens)
            plan = kvcompile.calibrate(model, recipe, [text.calibration_text()], tokenizer=tokenizer, program=program)
        else:
            plan = kvcompile.Plan.load_builtin(SHIPPED[name])
        unhealed[name] = plan
        saved = args.out / name.replace(" ", "-").replace(">", "")
        if (saved / "plan.json").exists():
            healed[name] = kvcompile.Plan.load(saved)
            if healed[name].meta["heal"]["healed_from"] != plan.fingerprint():  # a calibration on other hardware
                print(f"{saved} was healed from plan {healed[name].meta['heal']['healed_from']}, this run's {name} is "
                      f"{plan.fingerprint()}", flush=True)
        else:
            chunk = args.chunk_tokens or default_chunk_tokens(plan)
            batch = max(1, args.batch_size * 512 // chunk)
            began = time.perf_counter()
            result = kvcompile.heal(model, plan, [text.calibration_text()], tokenizer=tokenizer, program=program,
                                    steps=args.steps, lr=args.lr, rank=args.rank, batch_size=batch,
                                    chunk_tokens=chunk, tasks=args.heal_tasks, task_share=args.task_share,
                                    projections=args.projections, decode=args.decode)
            record = {**result.meta["heal"], "seconds": round(time.perf_counter() - began, 1)}
            healed[name] = replace(result, meta={**result.meta, "heal": record})
            healed[name].save(saved)
        record = healed[name].meta["heal"]
        print(f"{name}: healed in {record['seconds']} s, KL {record['initial_loss']:.3f} -> {record['final_loss']:.3f}",
              flush=True)

    methods = [evaluate.Method("dense")]
    for name in args.plans:
        methods += [evaluate.Method(name, unhealed[name]), evaluate.Method(f"{name} healed", healed[name])]
    methods += [evaluate.Method(spec, kvcompile.Plan.load_path_or_builtin(spec)) for spec in args.compare]
    settings = evaluate.EvalSettings(lengths=tuple(args.lengths), samples=args.samples, tasks=tuple(args.tasks),
                                     ppl_windows=args.ppl_windows, score_last=args.score_last)
    partial = lambda report: (args.out / "heal.json").write_text(json.dumps(report, indent=2) + "\n")
    report = evaluate.evaluate(model, tokenizer, methods, settings, model_name=DEFAULT_MODEL_NAME, program=program,
                               on_method=partial)
    report["healing"] = {name: plan.meta["heal"] for name, plan in healed.items()}
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "heal.json").write_text(json.dumps(report, indent=2) + "\n")
    print(evaluate.format_table(report))
    print(f"{report['model']} on {report['versions']['device']}, {report['seconds']} s")


if __name__ == "__main__":
    main()
