"""Scoring a trained run both ways of ``per_example_experts``: each row's experts gathered, or each expert run
over the rows that chose it (``alter_ds.mta.block``; the model picks by the memory each moves).

Scores the first N test examples of every task of the run (label scoring and greedy generation, as
``alter-ds study`` does) with the path forced to ``gathered`` and with the model's own choice (``auto``),
alternating them in fresh interpreters rep by rep so that both see the same machine load. Prints each case's
seconds, the median ratio and the largest difference of the task scores (same model, same examples: equal up
to fp32 rounding).

    python benchmarks/bench_per_example_paths.py studies/cpu/runs/alter-paper-seed0 --stage stage2 -n 25

Needs a finished run directory (its config names the tasks and the data root).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from isolated import run_case

CASES = ["gathered", "auto"]


def score_once(args: argparse.Namespace, case: str) -> dict:
    import torch

    import alter_ds.mta.block as block
    from alter_ds.config import load_config
    from alter_ds.data.tasks import load_split
    from alter_ds.evaluate import evaluate
    from alter_ds.mta.backbone import load_tokenizer
    from alter_ds.mta.model import MTAModel
    from alter_ds.run import RunLayout

    if case == "gathered":
        block._moves_less_by_expert = lambda *_: False  # type: ignore[assignment]
    torch.set_num_threads(args.threads)
    config = load_config(Path(args.run) / "config.yaml")
    layout = RunLayout.of(config)
    model = MTAModel.from_pretrained(layout.model_dir(layout.stage_index(args.stage))).eval()
    tokenizer = load_tokenizer(config.model)
    examples = {t.name: load_split(t, "test", config.data.root, 0).examples[: args.n] for t in config.tasks}
    start = time.perf_counter()
    results = evaluate(model, tokenizer, config.tasks, examples, model.is_encoder_decoder, args.batch_size, None)
    seconds = time.perf_counter() - start
    return {"case": case, "seconds": seconds, "scores": {task: r["score"] for task, r in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run directory")
    parser.add_argument("--stage", default="stage2")
    parser.add_argument("-n", type=int, default=25, help="test examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(score_once(args, args.one[0])))
        return
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    for rep in range(args.reps):
        for case in CASES:
            result = run_case(__file__, [case])
            runs[case].append(result)
            print(f"rep {rep} {case:9s} {result['seconds']:8.1f} s")
    median = {case: statistics.median(r["seconds"] for r in runs[case]) for case in CASES}
    first = {case: runs[case][0]["scores"] for case in CASES}
    worst = max(abs(first["auto"][t] - first["gathered"][t]) for t in first["auto"])
    print(
        f"\n{platform.processor() or platform.machine()}, {args.threads} threads, {args.run} {args.stage}, "
        f"{args.n} test examples per task, median of {args.reps}"
    )
    print(
        f"gathered {median['gathered']:.1f} s, auto {median['auto']:.1f} s, auto / gathered "
        f"{median['auto'] / median['gathered']:.3f}; largest score difference {worst:.3g} points"
    )


if __name__ == "__main__":
    main()
