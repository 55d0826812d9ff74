# shellcheck shell=bash
# The body of slurm/stage1.sh and slurm/stage2.sh, sourced by them with ALTER_DS_STAGE set.
#
# One rank per Slurm task, started by srun: Slurm owns every process (no ssh/pdsh between nodes, which the
# deepspeed launcher needs for several nodes), signals and `scancel` reach every rank, and the same script
# runs on GPU and CPU-only nodes. Each rank reads RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/SLURM_LOCALID/
# SLURM_NTASKS and meets the others at MASTER_ADDR (the allocation's first host) on a port derived from the
# job id, so two jobs sharing a node do not collide and a requeued job reuses its own.
#
# Preemption: the job asks for USR1 some minutes before its time limit (--signal=B:USR1@...), and an
# administrator or test can send it with `scancel --signal=USR1 --batch JOB`. The trap forwards it to the
# ranks, which checkpoint at the next step boundary and exit 0; the job then requeues itself, and the
# restarted job resumes from that checkpoint (train.py --resume auto). SIGTERM (scancel, preemption by a
# higher-priority job) is forwarded too, so the ranks checkpoint before Slurm's KillWait runs out, but the
# job does not requeue itself then: a cancelled job stays cancelled, and Slurm's own preemption requeues.

set -euo pipefail

usage="usage: sbatch [options] slurm/stage${ALTER_DS_STAGE}.sh CONFIG.yaml [train.py options]"
if [[ $# -lt 1 ]]; then echo "$usage" >&2; exit 2; fi
config=$1
shift
if [[ ! -f $config ]]; then echo "stage${ALTER_DS_STAGE}.sh: no config at $config ($usage)" >&2; exit 2; fi
python_bin=${ALTER_DS_PYTHON:-python}

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
gpus=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
if [[ -z ${DS_ACCELERATOR:-} && $gpus -eq 0 ]]; then
  export DS_ACCELERATOR=cpu  # DeepSpeed would otherwise look for CUDA; the trainer then uses gloo
fi
run_args=(--config "$config" --stage "$ALTER_DS_STAGE" --resume auto)
if [[ -n ${ALTER_DS_RUN_NAME:-} ]]; then run_args+=(--run-name "$ALTER_DS_RUN_NAME"); fi

echo "[$(date -Is)] job ${SLURM_JOB_ID} stage ${ALTER_DS_STAGE} restart ${SLURM_RESTART_COUNT:-0}:" \
  "${SLURM_NTASKS} ranks on ${hosts[*]}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}," \
  "accelerator ${DS_ACCELERATOR:-cuda}, config ${config}"

stop_signal=""
# shellcheck disable=SC2317  # called from the traps below
forward_stop() {
  stop_signal=$1
  echo "[$(date -Is)] job ${SLURM_JOB_ID} got SIG$1: asking the ranks to checkpoint"
  kill -USR1 "$srun_pid" 2>/dev/null || true  # srun passes USR1 on to every task
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# shellcheck disable=SC2016  # the variables are expanded per task, inside srun
# srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05+): pass it, or each rank gets one core.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" bash -c \
  'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec "$@"' rank \
  "$python_bin" -m alter_ds.train "${run_args[@]}" "$@" &
srun_pid=$!

# `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting until srun is gone.
status=0
wait "$srun_pid" || status=$?
while [[ $status -gt 128 ]] && kill -0 "$srun_pid" 2>/dev/null; do
  status=0
  wait "$srun_pid" || status=$?
done

if [[ $stop_signal == USR1 && $status -eq 0 ]]; then
  echo "[$(date -Is)] job ${SLURM_JOB_ID} checkpointed; requeueing it to resume"
  scontrol requeue "$SLURM_JOB_ID"
fi
echo "[$(date -Is)] job ${SLURM_JOB_ID} stage ${ALTER_DS_STAGE} exits with ${status}"
exit "$status"
