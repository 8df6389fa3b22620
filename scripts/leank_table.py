"""One markdown table from `kvcompile eval --json` reports run at different lengths with the same rows.

    python scripts/leank_table.py docs/leank-h100-2k.json docs/leank-h100-4k.json docs/leank-h100-8k.json

Retrieval columns are the tasks some row gets right; bytes per token are the longest report's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvcompile.evaluation.evaluate import cell_label, length_label


def table(reports: list[dict]) -> str:
    names = [row["name"] for row in reports[0]["rows"]]
    for report in reports[1:]:
        if [row["name"] for row in report["rows"]] != names:
            raise SystemExit("the reports have different rows; run them with the same plans and flags")
    rows = {name: {} for name in names}  # name -> merged accuracy/perplexity/agreement
    for report in reports:
        for row in report["rows"]:
            for field in ("accuracy", "perplexity", "agreement"):
                rows[row["name"]].setdefault(field, {}).update(row[field])
    longest = max(reports, key=lambda r: max(r["settings"]["lengths"]))
    last = {row["name"]: row for row in longest["rows"]}
    cells = [key for key in rows[names[0]]["accuracy"] if any(rows[n]["accuracy"][key]["correct"] for n in names)]
    lengths = sorted(rows[names[0]]["perplexity"], key=int)
    at = f"@{length_label(max(lengths, key=int))}"
    header = ["method", *[cell_label(key) for key in cells], *[f"ppl@{length_label(n)}" for n in lengths],
              *[f"agree@{length_label(n)}" for n in lengths], f"K B/tok{at}", f"V B/tok{at}", f"KV vs dense{at}"]
    dense = last[names[0]]["k_bytes_per_token"] + last[names[0]]["v_bytes_per_token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        row, measured = rows[name], last[name]
        kv = measured["k_bytes_per_token"] + measured["v_bytes_per_token"]
        line = [name, *[f"{row['accuracy'][key]['correct']}/{row['accuracy'][key]['samples']}" for key in cells],
                *[f"{row['perplexity'][n]:.2f}" for n in lengths], *[f"{row['agreement'][n]:.2f}" for n in lengths],
                f"{measured['k_bytes_per_token']:.0f}", f"{measured['v_bytes_per_token']:.0f}", f"{kv / dense:.2f}x"]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    print(table([json.loads(path.read_text()) for path in parser.parse_args().reports]))
