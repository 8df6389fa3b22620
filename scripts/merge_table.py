"""KV-head merging on SmolLM2-135M-Instruct: dense vs merged plans, one evaluation-harness table.

    python scripts/merge_table.py --json merge.json      # a CUDA machine takes ~5 minutes

Rows: merged 3 KV heads -> 1 in the upper half of the layers and in all layers, each with the
RoPE-commuting fold, the post-RoPE projection and the paper's mean-pooling baseline; all 3 -> 2
(two heads' worth, commute). Calibration text and evaluation text are disjoint.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import kvcompile
from kvcompile.evaluation import evaluate, text
from kvcompile.models import DEFAULT_MODEL_NAME, load_default_model

UPPER_HALF = tuple(range(15, 30))
RECIPES = {
    "commute 3->1 L15-29": dict(kv_group_size=3, rope="commute", merge_layers=UPPER_HALF),
    "post 3->1 L15-29": dict(kv_group_size=3, rope="post", merge_layers=UPPER_HALF),
    "mean-pool 3->1 L15-29": dict(kv_group_size=3, merge_method="mean-pool", merge_layers=UPPER_HALF),
    "commute 3->2 all": dict(kv_group_size=3, kv_heads_per_group=2, rope="commute"),
    "commute 3->1 all": dict(kv_group_size=3, rope="commute"),
    "post 3->1 all": dict(kv_group_size=3, rope="post"),
    "mean-pool 3->1 all": dict(kv_group_size=3, merge_method="mean-pool"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = load_default_model()
    model = model.to(args.device)
    program = kvcompile.capture(model)
    methods = [evaluate.Method("dense")]
    for name, fields in RECIPES.items():
        recipe = kvcompile.Recipe(**fields, calib_tokens=args.calib_tokens)
        plan = kvcompile.calibrate(model, recipe, [text.calibration_text()], tokenizer=tokenizer, program=program)
        methods.append(evaluate.Method(name, plan))
    settings = evaluate.EvalSettings(lengths=tuple(args.lengths), samples=args.samples)
    report = evaluate.evaluate(model, tokenizer, methods, settings, model_name=DEFAULT_MODEL_NAME, program=program)
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(evaluate.format_table(report))
    print(f"{report['model']} on {report['versions']['device']}, {report['seconds']} s")


if __name__ == "__main__":
    main()
