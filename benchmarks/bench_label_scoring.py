"""Label scoring: one forward per (example, label) against one prompt forward per example (KV cache shared).

Scores the first N test examples of classification tasks of the default suite with both paths on the same
model and reports the wall time of each, their ratio, and the largest score difference.

    python benchmarks/bench_label_scoring.py --model models/SmolLM2-135M-Instruct --tasks newsgroups imdb -n 32

Needs `alter-ds prepare-data` (the task files) and a local model directory (`alter-ds prepare-model smollm2
--out models/SmolLM2-135M-Instruct`).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from alter_ds.config import MTAConfig, load_config
from alter_ds.data.tasks import load_split
from alter_ds.evaluate import label_scores_per_pair, label_scores_shared_prompt
from alter_ds.mta import MTAModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face causal LM directory")
    parser.add_argument("--config", default="configs/demo.yaml", help="where the task definitions come from")
    parser.add_argument("--tasks", nargs="+", default=["newsgroups", "imdb"])
    parser.add_argument("-n", type=int, default=32, help="test examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experiment = load_config(Path(args.config))
    tasks = [t for t in experiment.tasks if t.name in args.tasks]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = MTAModel(AutoModelForCausalLM.from_pretrained(args.model), MTAConfig(), tasks).eval()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'task':<14}{'labels':>7}{'n':>5}{'per pair s':>12}{'shared s':>10}{'ratio':>8}{'max |diff|':>12}")
    for task_id, task in enumerate(tasks):
        examples = load_split(task, "test", experiment.data.root).examples[: args.n]
        items = [(task_id, i, e) for i, e in enumerate(examples)]
        timings, scores = [], []
        for scorer in (label_scores_per_pair, label_scores_shared_prompt):
            start = time.perf_counter()
            scores.append(scorer(model, tokenizer, tasks, items, False, args.batch_size))
            timings.append(time.perf_counter() - start)
        difference = max(abs(a - b) for x, y in zip(*scores) for a, b in zip(x, y))
        labels = len(set(task.labels.values()))
        print(
            f"{task.name:<14}{labels:>7}{len(items):>5}{timings[0]:>12.1f}{timings[1]:>10.1f}"
            f"{timings[0] / timings[1]:>7.1f}x{difference:>12.2e}"
        )


if __name__ == "__main__":
    main()
