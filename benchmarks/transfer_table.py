"""The transfer table of docs/quality.md from what ``alter-ds transfer`` wrote in each run.

    python benchmarks/transfer_table.py studies/cpu/runs/task-moe-seed0 studies/cpu/runs/alter-ds-seed0

Reads ``<run>/transfer/<task>_<mode>.json`` (one per unseen task and mode: ``16-shot``, ``zero-shot``) and
prints one markdown row per (run, mode, task) with the run's score, the single-adapter baseline's on the same
test examples after the same K examples, their difference, and the nearest known task the placement chose;
then the ARG over the unseen tasks per (run, mode).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    print("| run | mode | task | metric | n | score | baseline | difference | nearest known task |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for run in args.runs:
        records = sorted(
            (json.loads(p.read_text()) for p in Path(run, "transfer").glob("*.json")),
            key=lambda r: (r["mode"] != "zero-shot", r["mode"], r["task"]),
        )
        by_mode: dict[str, list[float]] = {}
        for r in records:
            base = r["baseline_score"]
            difference = f"{r['score'] - base:+.1f}" if base is not None else "-"
            shown = f"{base:.1f}" if base is not None else "-"
            print(
                f"| {Path(run).name} | {r['mode']} | {r['task']} | {r['metric']} | {r['examples']} | "
                f"{r['score']:.1f} | {shown} | {difference} | {r['nearest']} |"
            )
            if base:
                by_mode.setdefault(r["mode"], []).append((r["score"] - base) / base)
        summary += [(Path(run).name, mode, gains) for mode, gains in by_mode.items()]
    print()
    print("| run | mode | ARG vs single-adapter over the unseen tasks (%) |")
    print("|---|---|---|")
    for name, mode, gains in summary:
        print(f"| {name} | {mode} | {100 * sum(gains) / len(gains):+.1f} ({len(gains)} tasks) |")


if __name__ == "__main__":
    main()
