#!/usr/bin/env bash
# Stage 2 of an alter-ds experiment: sbatch [sbatch options] slurm/stage2.sh CONFIG.yaml [train.py options]
# The defaults below are for one 8-GPU node; slurm/README.md has the options, environment and preemption.
#SBATCH --job-name=alter-ds-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
: "${SLURM_JOB_ID:?submit this script with sbatch (see slurm/README.md)}"
ALTER_DS_STAGE=2
# sbatch runs a copy of this file: job.sh is next to the submitted original, which Slurm names.
# shellcheck source=slurm/job.sh
source "${ALTER_DS_SLURM_DIR:-$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")}/job.sh"
