#!/usr/bin/env bash
# Stage 1 of an alter-ds experiment on a Slurm allocation:
#   sbatch [sbatch options] slurm/stage1.sh CONFIG.yaml [train.py options]
# Defaults below are for one 8-GPU node; override any of them on the command line, e.g. two CPU-only
# nodes: sbatch --nodes=2 --gpus-per-node=0 --ntasks-per-node=4 --cpus-per-task=8 slurm/stage1.sh cfg.yaml
# Environment: ALTER_DS_PYTHON (default: python on PATH, so activate the environment before sbatch),
# ALTER_DS_RUN_NAME (overrides the config's run_name), MASTER_PORT, DS_ACCELERATOR.
# The run directory is <training.output_dir>/<run_name>, relative to the directory sbatch ran in.
#SBATCH --job-name=alter-ds-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

: "${SLURM_JOB_ID:?submit this script with sbatch (see slurm/README.md)}"
# sbatch runs a copy of this file, so find job.sh next to the submitted original.
script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
ALTER_DS_STAGE=1
# shellcheck source=slurm/job.sh
source "${ALTER_DS_SLURM_DIR:-$(dirname "$script")}/job.sh"
