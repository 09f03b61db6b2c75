#!/bin/bash
# Multi-node training under slurm: edit the #SBATCH lines, then `sbatch example_train.sh`.
# One task per GPU; every task runs the same command and reads its rank from slurm
# (SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS). Rendezvous: MASTER_ADDR / MASTER_PORT below
# (env://, nothing to clean up between runs). Preemption: slurm sends SIGUSR1 (--signal below) or
# SIGTERM; the job finishes the current update, saves, and exits 0; `sbatch` the same script again
# (or use --requeue) and it resumes from the latest complete checkpoint. Slurm sends these signals
# to every process of the job step, DataLoader workers included; the workers ignore them and the
# training process of each task stops at an update all tasks agree on. Keep --signal without
# "B:" (that would signal only this batch shell, which would die of SIGUSR1).
# The log file (--output) is opened by slurm before this script runs, in the submit directory:
# it must name an existing folder (for a logs/ folder: `mkdir -p logs` before sbatch).
#SBATCH --job-name=stable-cascade
#SBATCH --partition=gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=%x_%j.out
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --exclusive

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"

SCRIPT=${SCRIPT:-train/train_c.py}
CONFIG=${CONFIG:-configs/training/finetune_c_3b.yaml}

# Rendezvous on the first node of the allocation.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
export NCCL_ASYNC_ERROR_HANDLING=1
# Weights and CLIP models must already be on disk (bash models/download_models.sh;
# huggingface-cli download laion/CLIP-ViT-bigG-14-laion2B-39B-b160k ...): no downloads mid-job.
export HF_HUB_OFFLINE=1

echo "job $SLURM_JOB_ID: $SLURM_NNODES node(s), $SLURM_NTASKS task(s), master $MASTER_ADDR:$MASTER_PORT"
srun --kill-on-bad-exit=1 python3 "$SCRIPT" "$CONFIG" "$@"
