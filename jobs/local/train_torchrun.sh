#!/usr/bin/env bash
# Train with several processes on this machine under torchrun (no batch system); extra arguments
# are Hydra overrides:
#   NPROC=2 jobs/local/train_torchrun.sh theory=u1_2d train.steps=200
# NPROC defaults to the number of GPUs (cuda or xpu), or 2 CPU processes without one; each rank
# takes cuda:/xpu:(local rank). DEVICE=cpu forces gloo on the CPU.
set -euo pipefail
nproc="${NPROC:-$(python -c 'import torch
n = torch.cuda.device_count() or (torch.xpu.device_count() if hasattr(torch, "xpu") else 0)
print(n or 2)')}"
device="${DEVICE:-auto}"
# split the cores between the ranks instead of letting each one spawn a thread per core
cores="$(python -c 'import os; print(len(os.sched_getaffinity(0)))')"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
# computed once here so every rank writes (rank 0) into the same directory
run_dir="outputs/train/local-$(date +%Y%m%d-%H%M%S)"
exec torchrun --standalone --nproc-per-node="${nproc}" --no-python \
    gaugeflow train dist=ddp dist.device="${device}" hydra.run.dir="${run_dir}" "$@"
