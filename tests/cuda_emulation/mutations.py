"""Checks that the device emulation catches the bugs it exists for: each mutation below breaks csrc/cuda/ in
one way a GPU kernel typically goes wrong (a missing barrier, wait or reduction step, a misaligned pitch, an
off-by-one tile), rebuilds the emulated kernels from a copy of csrc/ and runs tests/test_cuda_kernels_emulated.py
against it. Every mutation must make the tests fail; the real sources must pass.

    python tests/cuda_emulation/mutations.py            # all (about 40 s each on 2 cores)
    python tests/cuda_emulation/mutations.py barrier    # those whose name contains "barrier"

Not part of the test suite (each mutation is a fresh compile); run it after changing the emulation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name -> (file under csrc/, text, replacement); the text must occur exactly once.
MUTATIONS: dict[str, tuple[str, str, str]] = {
    "forward reads a chunk before its cp.async wait": (
        "cuda/tensor_core.cuh",
        "    cp_async_wait<1>();\n    __syncthreads();\n    if (warp_active) {\n      const T* xs",
        "    __syncthreads();\n    if (warp_active) {\n      const T* xs",
    ),
    "forward refills a down stage without a barrier": (
        "cuda/tensor_core.cuh",
        "    __syncthreads();  // the next iteration refills this stage\n",
        "\n",
    ),
    "forward reuses work for the up stages without a barrier": (
        "cuda/tensor_core.cuh",
        "  __syncthreads();  // A complete; `work` is free for the w_up stages\n",
        "\n",
    ),
    "forward reads the staging tile without __syncwarp": (
        "cuda/tensor_core.cuh",
        "__syncwarp();\n        const int i = lane >> 1;\n        const int half = (lane & 1) * 8;\n"
        "        const int row = warp * 16 + i;\n        const int n = n0 + half;\n"
        "        if (row < tile.rows && n < d) {  // d % 8",
        "const int i = lane >> 1;\n        const int half = (lane & 1) * 8;\n"
        "        const int row = warp * 16 + i;\n        const int n = n0 + half;\n"
        "        if (row < tile.rows && n < d) {  // d % 8",
    ),
    "chunk pitch of 68 elements (wmma leading dimension)": (
        "cuda/tensor_core.cuh",
        "constexpr int kChunkPitch = kChunk + 8;",
        "constexpr int kChunkPitch = kChunk + 4;",
    ),
    "backward refills its stage and red without a barrier": (
        "cuda/tensor_core.cuh",
        "    __syncthreads();  // the next iteration refills this stage and rewrites `red`\n",
        "\n",
    ),
    "backward reuses the G spill without a barrier": (
        "cuda/tensor_core.cuh",
        "  __syncthreads();  // dH complete; the G spill in `work` is dead\n",
        "\n",
    ),
    "backward drops the lane pair's bias dot": (
        "cuda/tensor_core.cuh",
        "  bias_dot += __shfl_xor_sync(kFullMask, bias_dot, 1);\n",
        "\n",
    ),
    "tiles one row too long": (
        "cuda/routing.cuh",
        "out.rows = min(tile_rows, seg_start[lo + 1] - out.row0);",
        "out.rows = min(tile_rows, seg_start[lo + 1] - out.row0 + 1);",
    ),
    "block scan reuses its scratch without a barrier": (
        "cuda/routing.cuh",
        "  __syncthreads();  // scratch is reused by the next call\n",
        "\n",
    ),
    "generic row GEMM refills its tiles without a barrier": (
        "cuda/generic.cuh",
        "        acc[1][q] += a1 * b;\n      }\n    }\n    __syncthreads();\n  }\n#pragma unroll\n"
        "  for (int p = 0; p < 2; ++p) {\n    const int i = ty * 2 + p;",
        "        acc[1][q] += a1 * b;\n      }\n    }\n  }\n#pragma unroll\n"
        "  for (int p = 0; p < 2; ++p) {\n    const int i = ty * 2 + p;",
    ),
    "generic mixture-weight gradient stops its warp reduction early": (
        "cuda/generic.cuh",
        "for (int offset = 16; offset > 0; offset >>= 1) gw += __shfl_xor_sync(kFullMask, gw, offset);\n"
        "  if (lane == 0) grad_weights[a] = gw;",
        "for (int offset = 16; offset > 1; offset >>= 1) gw += __shfl_xor_sync(kFullMask, gw, offset);\n"
        "  if (lane == 0) grad_weights[a] = gw;",
    ),
}

_RUN_TESTS = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import emulated_cuda
emulated_cuda.CSRC = Path({csrc!r})
import pytest
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", {test_file!r}]))
"""


def run_tests(csrc: Path, extensions: Path) -> subprocess.CompletedProcess[str]:
    code = _RUN_TESTS.format(
        tests=str(REPO / "tests"), csrc=str(csrc), test_file=str(REPO / "tests" / "test_cuda_kernels_emulated.py")
    )
    env = dict(os.environ, ALTER_DS_EXTENSIONS_DIR=str(extensions))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("E ") or "Fatal Python error" in line or "device emulation" in line:
            return line.strip()[:160]
    return output.strip().splitlines()[-1][:160] if output.strip() else "(no output)"


def main(selection: list[str]) -> int:
    chosen = {name: m for name, m in MUTATIONS.items() if not selection or any(s in name for s in selection)}
    missed = []
    with tempfile.TemporaryDirectory(prefix="alter-ds-mutations-") as scratch:
        root = Path(scratch)
        for name, (relative, text, replacement) in chosen.items():
            csrc = root / "csrc"
            shutil.rmtree(csrc, ignore_errors=True)
            shutil.copytree(REPO / "csrc", csrc)
            source = (csrc / relative).read_text()
            if source.count(text) != 1:
                print(f"?? {name}: the text to mutate occurs {source.count(text)} times in csrc/{relative}")
                missed.append(name)
                continue
            (csrc / relative).write_text(source.replace(text, replacement))
            done = run_tests(csrc, root / "extensions")
            caught = done.returncode != 0
            print(f"{'caught' if caught else 'MISSED'}  {name}: {first_failure(done.stdout + done.stderr)}", flush=True)
            if not caught:
                missed.append(name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
