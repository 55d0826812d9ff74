#!/usr/bin/env bash
# Submit both stages of an experiment: stage 2 starts only after stage 1 completes (afterok), and reads the
# model stage 1 exported into the run directory.
#   slurm/pipeline.sh CONFIG.yaml [sbatch options for both jobs...]
# e.g. slurm/pipeline.sh configs/alter-ds.yaml --nodes=2 --partition=gpu
# Prints both job ids. A requeued stage 1 keeps stage 2 waiting; a failed one cancels it.
set -euo pipefail

if [[ $# -lt 1 ]]; then echo "usage: $0 CONFIG.yaml [sbatch options...]" >&2; exit 2; fi
config=$1
shift
if [[ ! -f $config ]]; then echo "pipeline.sh: no config at $config" >&2; exit 2; fi
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Refuse a broken config now rather than after hours in the queue.
"${ALTER_DS_PYTHON:-python}" -m alter_ds.cli check-config "$config" >/dev/null

stage1=$(sbatch --parsable "$@" "$here/stage1.sh" "$config")
stage1=${stage1%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
stage2=$(sbatch --parsable --dependency="afterok:$stage1" --kill-on-invalid-dep=yes "$@" "$here/stage2.sh" "$config")
stage2=${stage2%%;*}
echo "stage 1: job $stage1"
echo "stage 2: job $stage2 (starts after job $stage1 completes)"
