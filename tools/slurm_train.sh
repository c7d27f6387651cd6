#!/bin/bash
# Example SLURM job: multi-node GPU training. One task per node; each task drives all GPUs of its node, and
# jax.distributed.initialize() (bioclip-jax train --distributed) reads the cluster layout from SLURM's variables.
#
#   sbatch tools/slurm_train.sh configs/bioclip_vitb16.py /shared/runs/bioclip --config.data.train=/shared/tol10m/train
#
# Rerunning the same job (or a requeue after preemption: SLURM sends SIGTERM, the trainer saves) resumes exactly.
#SBATCH --job-name=bioclip-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch tools/slurm_train.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: sbatch tools/slurm_train.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2

# Let XLA use most of the GPU memory and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

srun --kill-on-bad-exit=1 bioclip-jax train --distributed --config "$CONFIG" --workdir "$WORKDIR" \
    --config.dtype=bfloat16 --config.attn_implementation=cudnn "$@"
