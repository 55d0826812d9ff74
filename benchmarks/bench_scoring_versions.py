"""The study's scoring of one model, this checkout against an earlier revision of alter-ds.

Runs ``alter_ds.evaluate.evaluate`` (label scoring of the classification tasks, greedy generation of the others)
on the first N test examples of every task of a config, with the backbone as the study scores it (no experts),
once per revision and repetition, alternating the revisions in fresh interpreters, so that both see the same
machine load. Prints each run's seconds, the median ratio, and the largest difference of the task scores
(same examples, same model: they should agree up to fp32 rounding of another batch layout) and the tokens
that went through the backbone (padding included, every generation step counted).

    python benchmarks/bench_scoring_versions.py --model models/SmolLM2-135M-Instruct --against 1ee3d66 -n 50

Needs `alter-ds prepare-data` and a local model directory; the earlier revision's ``alter_ds`` is exported
from git into a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def score_once(args: argparse.Namespace) -> dict:
    import torch

    from alter_ds.config import load_config
    from alter_ds.data.tasks import load_split
    from alter_ds.evaluate import evaluate
    from alter_ds.mta.backbone import load_tokenizer
    from alter_ds.mta.model import build_model

    config = load_config(Path(args.config))
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, name_or_path=args.model),
        mta=dataclasses.replace(config.mta, layers="none", encoder_layers=None, decoder_layers=None),
    )
    tokenizer = load_tokenizer(config.model)
    model = build_model(config).eval()
    examples = {t.name: load_split(t, "test", config.data.root, 0).examples[: args.n] for t in config.tasks}
    tokens = [0]

    def count(_module: object, _args: tuple, kwargs: dict) -> None:  # every forward, generation steps included
        ids = kwargs.get("input_ids")
        tokens[0] += ids.numel() if ids is not None else 0

    model.backbone.register_forward_pre_hook(count, with_kwargs=True)
    start = time.perf_counter()
    results = evaluate(model, tokenizer, config.tasks, examples, model.is_encoder_decoder, args.batch_size, None)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "tokens": tokens[0],
        "scores": {t: r["score"] for t, r in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face causal LM directory")
    parser.add_argument("--against", help="the earlier git revision (required)")
    parser.add_argument("--config", default="configs/demo.yaml", help="where the tasks come from")
    parser.add_argument("-n", type=int, default=50, help="test examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(score_once(args)))
        return
    if not args.against:
        parser.error("--against REVISION is required")
    case = ["--model", args.model, "--config", args.config, "-n", str(args.n), "--batch-size", str(args.batch_size)]
    with tempfile.TemporaryDirectory() as earlier:
        archive = subprocess.run(
            ["git", "archive", args.against, "alter_ds"], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", earlier], input=archive.stdout, check=True)
        sources = {args.against: earlier, "this checkout": str(REPO)}
        runs: dict[str, list[dict]] = {name: [] for name in sources}
        for rep in range(args.reps):
            for name, source in sources.items():
                env = dict(os.environ, PYTHONPATH=source)
                out = subprocess.run(
                    [sys.executable, __file__, *case, "--one"], env=env, cwd=REPO, capture_output=True, text=True
                )
                if out.returncode:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  rep {rep + 1} {name}: {runs[name][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    before, after = (statistics.median(r["seconds"] for r in runs[name]) for name in sources)
    scores = [runs[name][0]["scores"] for name in sources]
    difference = max(abs(scores[0][t] - scores[1][t]) for t in scores[0])
    threads = runs["this checkout"][0]["threads"]
    print(f"{platform.processor() or platform.machine()}, {threads} threads; {args.n} test examples per task of")
    print(f"{args.config}, batch {args.batch_size}, median of {args.reps}")
    print(f"{'revision':<16}{'seconds':>30}{'median':>9}{'tokens through the model':>26}")
    for name in sources:
        seconds = [r["seconds"] for r in runs[name]]
        shown = " ".join(f"{value:.1f}" for value in seconds)
        print(f"{name:<16}{shown:>30}{statistics.median(seconds):>9.1f}{runs[name][0]['tokens']:>26,}")
    print(f"ratio {before / after:.2f}x; largest task-score difference {difference:.3g} points")
    for task in scores[0]:
        print(f"  {task:<20}{scores[0][task]:>8.2f}{scores[1][task]:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "ratio": before / after}, indent=2))


if __name__ == "__main__":
    main()
