#!/usr/bin/env bash
# The wheels the GPU machine's image lacks (it reaches no registry), for CPython 3.12 on x86_64 Linux, into
# .whl/ (git-ignored); benchmarks/gpu_check.sh installs them there. The versions are the ones this project is
# tested with. deepspeed and rouge-score ship only sources: they are built here as pure-Python wheels
# (DeepSpeed's ops are compiled on first use, on the GPU machine). Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
python=${PYTHON:-python3}
binary=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 nltk==3.10.4
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${binary[@]}"
for source in deepspeed==0.19.8 rouge-score==0.1.2; do
  name=${source%%==*}
  if ! ls "$dest"/"${name//-/_}"-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$source"
  fi
done
ls "$dest"
du -sh "$dest"
