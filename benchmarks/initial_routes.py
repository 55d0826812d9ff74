"""The routes a task_embedding stage starts from, scored like the routes it ended with.

With ``embedding_init: inputs`` a task-level MoE's first routes already follow the tasks' inputs, so the
agreement of its learned routes with the task categories has to be read against the routes it started from.
This builds the stage's model as the trainer does (same seed, rank 0), initialises the task-embedding table
from the same training inputs, and prints the ARI/NMI of its argmax routes, and the share of (task, layer)
routes the finished stage kept (from the run's ``eval/<stage>_routing.json``):

    python benchmarks/initial_routes.py studies/cpu/runs/task-moe-seed0 --stage 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from alter_ds.analysis import Routing, analyze
from alter_ds.config import load_config
from alter_ds.data.collate import MultiTaskCollator
from alter_ds.data.multitask import MultiTaskData
from alter_ds.mta.backbone import is_seq2seq, load_tokenizer
from alter_ds.mta.model import build_model
from alter_ds.mta.task_embeddings import init_from_inputs
from alter_ds.run import RunLayout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--stage", default="1")
    args = parser.parse_args()
    root = Path(args.run_dir)
    config = load_config(root / "config.yaml")
    layout = RunLayout.of(config, root)
    index = layout.stage_index(args.stage)
    stage = config.stages[index]
    if stage.router.kind != "task_embedding" or index != 0:
        raise SystemExit("this reads the first stage of a task_embedding run (its table is made there)")
    torch.manual_seed(config.seed + 1000 * index)  # what train_stage seeds rank 0 with
    tokenizer = load_tokenizer(config.model)
    seq2seq = is_seq2seq(config.model)
    data = MultiTaskData.load(config.tasks, tokenizer, seq2seq, "train", config.data.root, config.seed)
    model = build_model(config)
    model.apply_stage(stage)
    if stage.router.embedding_init == "inputs":
        collate = MultiTaskCollator(tokenizer.pad_token_id, seq2seq)
        init_from_inputs(model, data.examples, collate, stage.router.embedding_examples)
    model.eval()
    start = {name: block.router.task_mixture(0).numpy() for name, block in model.blocks.items()}
    names, categories = [t.name for t in config.tasks], [t.category for t in config.tasks]
    initial = analyze(Routing(names, categories, start), seed=config.seed)
    print(f"routes at the start of {stage.name}: ARI {initial.adjusted_rand_index:.3f}, "
          f"NMI {initial.normalized_mutual_info:.3f}, clusters {initial.clusters}")  # fmt: skip
    finished = layout.routing_file(stage.name)
    if finished.is_file():
        end = {k: np.asarray(v) for k, v in json.loads(finished.read_text())["layers"].items()}
        kept = np.mean([(end[n].argmax(-1) == start[n].argmax(-1)).mean() for n in start])
        final = analyze(Routing(names, categories, end), seed=config.seed)
        print(f"routes at its end (dev): ARI {final.adjusted_rand_index:.3f}, NMI "
              f"{final.normalized_mutual_info:.3f}; (task, layer) routes kept: {100 * kept:.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
