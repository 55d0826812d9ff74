"""A few grouped-adapter cases, forward and backward, through the compiled kernels of one device: what
``compute-sanitizer --tool memcheck|racecheck`` runs on the GPU machine (``benchmarks/gpu_check.sh``), and what
its ``--dry-run`` runs on the CPU kernel. Each case is checked against the fp64 loop, so a kernel that the
sanitizer passes but that computes the wrong thing fails here too.

    python benchmarks/gpu_kernel_cases.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from grouped_inputs import errors_against_loop, make_inputs, rounded

from alter_ds.ops import grouped_adapter
from alter_ds.ops.build import load_cuda_extension, load_extension

# small enough for the sanitizers (each launch is replayed under instrumentation), shaped to reach both CUDA
# kernel families: tensor cores (bf16, d % 8 == 0, r <= 64) and the generic kernels (fp32, odd widths)
CASES = {
    "bf16 d64 r16 k1 (tensor cores)": (dict(n=300, d=64, r=16, experts=4, k=1), torch.bfloat16, "gelu"),
    "bf16 d72 r17 k2 swiglu (tensor cores)": (dict(n=200, d=72, r=17, experts=3, k=2), torch.bfloat16, "swiglu"),
    "fp32 d11 r3 k2 (generic)": (dict(n=130, d=11, r=3, experts=5, k=2), torch.float32, "relu"),
    "bf16 one hot expert (tensor cores)": (
        dict(n=400, d=32, r=16, experts=5, k=1, ids=torch.full((400, 1), 3)),  # as the emulated test's
        torch.bfloat16,
        "gelu",
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = parser.parse_args()
    if not load_extension() or (args.device == "cuda" and not load_cuda_extension()):
        print("the extension did not build (see the warning above)", file=sys.stderr)
        return 1
    os.environ["ALTER_DS_GROUPED_ADAPTER"] = "cpp" if args.device == "cpu" else "cuda"
    worst = 0.0
    # the CPU kernel runs them in fp32: the dry run checks this script, not bf16 on CPUs
    limit = 1e-2 if args.device == "cuda" else 1e-4  # bf16 outputs round to 8 bits (the GPU tests' bound)
    for name, (shape, dtype, activation) in CASES.items():
        dtype = dtype if args.device == "cuda" else torch.float32
        tensors, act = make_inputs(**shape, activation=activation)
        low = rounded(tensors, dtype, weights_dtype=torch.float32)
        moved = [t.to(args.device) if t is not None else None for t in low]
        errors = errors_against_loop(grouped_adapter, moved, act)
        largest = max(errors.values())
        worst = max(worst, largest)
        print(f"{name}: largest relative error {largest:.2e}")
    print(f"worst {worst:.2e} (limit {limit:g})")
    return 0 if worst < limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
