#!/usr/bin/env bash
# Generate an HMC ensemble on this machine; extra arguments are Hydra overrides.
#   jobs/local/hmc.sh theory=su3_4d 'lattice.shape=[8,8,8,8]' hmc.n_traj=200
# Ends cleanly before a budget (hmc.max_time) or on SIGTERM, with the file written.
set -euo pipefail
run_dir="outputs/hmc/local-$(date +%Y%m%d-%H%M%S)"
exec gaugeflow hmc hydra.run.dir="$run_dir" out="$run_dir/ensemble.h5" "$@"
