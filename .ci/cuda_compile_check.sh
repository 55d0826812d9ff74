#!/usr/bin/env bash
# Compile check of the CUDA kernels (csrc/cuda) for sm_80 and sm_90; needs nvcc, not a GPU.
#
# The CUDA build of torch it compiles against lives in a venv cached under
# ${XDG_CACHE_HOME:-$HOME/.cache}/alter-ds/, named after a hash of .ci/cuda-requirements.txt, so the
# multi-GB install happens once per machine and again only when the pins change. Without nvcc it says
# so in one line and exits 0.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

nvcc_bin="$(command -v nvcc || true)"
if [[ -z "$nvcc_bin" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then nvcc_bin="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$nvcc_bin" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc_bin=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc_bin" ]]; then
  echo "cuda compile check: skipped, no nvcc found (install the CUDA toolkit to run it)"
  exit 0
fi

# torch links against CUDA_HOME/lib64 (or lib). When nvcc on PATH is a wrapper script outside the toolkit
# (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc), torch would guess CUDA_HOME=/usr/local
# and fail to find libcudart, so point it at the toolkit that holds a real bin/nvcc.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for candidate in "$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")" /usr/local/cuda; do
    if [[ -x "$candidate/bin/nvcc" && ( -d "$candidate/lib64" || -d "$candidate/lib" ) ]] &&
      ls "$candidate"/lib*/libcudart.so* >/dev/null 2>&1; then
      export CUDA_HOME="$candidate"
      break
    fi
  done
fi

requirements="$repo/.ci/cuda-requirements.txt"
key="$(sha256sum "$requirements" | cut -c1-16)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/alter-ds"
venv="$cache/cuda-check-venv-$key"
mkdir -p "$cache"

# One installer at a time; a venv without the stamp (an interrupted install) is rebuilt from scratch.
exec 9>"$cache/cuda-check-venv.lock"
flock 9
if [[ ! -f "$venv/.installed" ]]; then
  python="${ALTER_DS_CUDA_CHECK_PYTHON:-$(command -v python3.11 || command -v python3)}"
  echo "cuda compile check: creating $venv with $("$python" --version 2>&1) (one-off, several GB)"
  start=$(date +%s)
  rm -rf "$cache"/cuda-check-venv-*  # this venv's previous versions: several GB each
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$venv/.installed"
  echo "cuda compile check: venv ready in $(( $(date +%s) - start )) s"
fi
flock -u 9

cd "$repo"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="8.0;9.0" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
  "$venv/bin/python" -m alter_ds.ops.build --compile-check-cuda "$@"
echo "cuda compile check: passed in $(( $(date +%s) - start )) s (sm_80, sm_90)"
