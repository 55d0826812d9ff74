#!/usr/bin/env bash
# One prepared run on a GPU machine that reaches no registry (the project's lent H200), sized for about 8 minutes:
#   bash benchmarks/gpu_wheels.sh            # here, once: the wheels its image lacks, into .whl/
#   bash benchmarks/gpu_check.sh             # there, from the repository root, with .whl/ carried along
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the GPU steps skipped, everything else run (CI does)
# Each step is timed and its log written to $OUT (default /tmp/gpu_check): summary.txt lists them.
#   install   the carried wheels into a target directory (the dry run: for CPython 3.12, into a scratch one)
#   kernels   pytest -m gpu: both CUDA kernel families against the fp64 loop at model widths
#   memcheck  compute-sanitizer memcheck on benchmarks/gpu_kernel_cases.py (racecheck likewise)
#   train     benchmarks/gpu_train_check.py: NCCL + bf16 through the launcher, SIGTERM, resume, collective devices
#   op        benchmarks/bench_grouped_adapter.py at d=4096, r=16, N=32k, T=4/16/64, three routings
#   step      benchmarks/bench_mta_step.py on the GPU: SmolLM2-135M architecture, bf16, T=16
#   peers     benchmarks/bench_peers.py on the GPU: LoRA experts against PEFT (per-task adapters, one LoRA)
# The dry run runs install (scratch), the kernel cases, the training check and a one-layer peer comparison on
# the CPU, and collects the GPU tests, so the script cannot rot unnoticed. Exit status: the number of failed steps (0: all passed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
dry_run=0
[[ ${1:-} == --dry-run ]] && dry_run=1
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
: >"$out/summary.txt"
python=${PYTHON:-python3}
failed=0

step() {  # step NAME COMMAND...: run, time, log to $out/NAME.log, one summary line
  local name=$1 started status
  shift
  started=$(date +%s)
  if "$@" >"$out/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?, see $name.log)"; failed=$((failed + 1)); fi
  echo "$name: $status in $(($(date +%s) - started)) s" | tee -a "$out/summary.txt"
}

skip() {
  echo "$1: skipped (dry run: $2)" | tee -a "$out/summary.txt"
}

# shellcheck disable=SC2317  # called through step
install_wheels() {
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no wheels in .whl/: run benchmarks/gpu_wheels.sh first" >&2
    return 1
  fi
  local target=${ALTER_DS_SITE:-/tmp/alter-ds-site} cross=()
  if ((dry_run)); then  # this python is not the GPU machine's 3.12: install for it, into a scratch target
    target="$out/site"
    cross=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any)
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "${cross[@]}" .whl/*.whl || return 1
  ls "$target"
}

step install install_wheels
if ((!dry_run)); then
  export PYTHONPATH="${ALTER_DS_SITE:-/tmp/alter-ds-site}:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="${ALTER_DS_SITE:-/tmp/alter-ds-site}/bin:$PATH"  # the deepspeed launcher
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if ((dry_run)); then
  step kernels "$python" -m pytest -q -m gpu --collect-only tests/test_grouped_adapter_kernels.py
  step kernel-cases "$python" benchmarks/gpu_kernel_cases.py --device cpu
  skip memcheck "needs a GPU and compute-sanitizer"
  skip racecheck "needs a GPU and compute-sanitizer"
  step train "$python" benchmarks/gpu_train_check.py --out "$out/train"
  skip op "needs a GPU"
  skip step "needs a GPU"
  step peers "$python" benchmarks/bench_peers.py --layers 1 --batch 8 --length 8 --tasks 4 --reps 1 --warmup 0
else
  step kernels "$python" -m pytest -q -m gpu tests/test_grouped_adapter_kernels.py
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$python" benchmarks/gpu_kernel_cases.py
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$python" benchmarks/gpu_kernel_cases.py
  step train "$python" benchmarks/gpu_train_check.py --out "$out/train"
  step op "$python" benchmarks/bench_grouped_adapter.py --device cuda --dtype bf16 --d 4096 --r 16 --n 32768 \
    --experts 4 16 64 --json "$out/op.json"
  step step "$python" benchmarks/bench_mta_step.py --device cuda --dtype bf16 --tasks 16 --reps 10 \
    --json "$out/step.json"
  step peers "$python" benchmarks/bench_peers.py --device cuda --tasks 4 16 64 --reps 5 --json "$out/peers.json"
fi
echo "failed steps: $failed" | tee -a "$out/summary.txt"
exit "$failed"
