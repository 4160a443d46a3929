#!/usr/bin/env bash
# The job matrix on an accelerator: hmc, train, sample and score of every field space on a small
# lattice, plus `dist=ddp` on one device under torchrun. Each line prints PASS or FAIL with the
# job's last error line; the exit status is the number of failures.
#   tools/device_matrix.sh cuda        # or xpu; default: cuda
#   OUT=/tmp/matrix tools/device_matrix.sh cuda
set -u
DEV=${1:-cuda}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export WANDB_MODE=disabled HYDRA_FULL_ERROR=0
fails=0

run() {  # run NAME CMD...: one line per job
    local name=$1; shift
    local t0=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        printf 'PASS %-28s %4ds\n' "$name" $((SECONDS - t0))
    else
        printf 'FAIL %-28s %4ds  %s\n' "$name" $((SECONDS - t0)) "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1)"
        fails=$((fails + 1))
    fi
}

python -c "import torch, gaugeflow; print('torch', torch.__version__, 'gaugeflow', gaugeflow.__version__)"
for spec in "u1_2d [8,8]" "su2_2d [8,8]" "su3_2d [8,8]" "phi4_2d [8,8]" "su3_4d [4,4,4,4]"; do
    set -- $spec
    th=$1 shape=$2
    run "hmc-$th" gaugeflow hmc theory=$th "lattice.shape=$shape" device=$DEV hmc.n_traj=5 hmc.n_therm=2 \
        hmc.progress=false "out=$OUT/$th-hmc.h5" "hydra.run.dir=$OUT/$th-hmc"
    run "train-$th" gaugeflow train theory=$th "lattice.shape=$shape" device=$DEV dist.device=$DEV train.steps=3 \
        train.batch_size=4 train.eval_samples=16 train.progress=false "hydra.run.dir=$OUT/$th-train"
    run "sample-$th" gaugeflow sample "checkpoint=$OUT/$th-train" device=$DEV sample.n=16 sample.batch_size=8 \
        sample.progress=false "out=$OUT/$th-flow.h5" "hydra.run.dir=$OUT/$th-sample"
    run "score-$th" gaugeflow score "checkpoint=$OUT/$th-train" "ensemble=$OUT/$th-hmc.h5" device=$DEV \
        score.progress=false "out=$OUT/$th-scores.h5" "hydra.run.dir=$OUT/$th-score"
done
run "train-ddp-u1_2d" torchrun --standalone --nproc-per-node=1 -m gaugeflow.cli.main train dist=ddp \
    dist.device=$DEV "lattice.shape=[8,8]" train.steps=3 train.batch_size=4 train.eval_samples=16 \
    train.progress=false "hydra.run.dir=$OUT/ddp-train"
run "sample-ddp-u1_2d" torchrun --standalone --nproc-per-node=1 -m gaugeflow.cli.main sample dist=ddp \
    dist.device=$DEV "checkpoint=$OUT/ddp-train" sample.n=16 sample.batch_size=8 sample.progress=false \
    "out=$OUT/ddp-flow.h5" "hydra.run.dir=$OUT/ddp-sample"
echo "logs in $OUT; $fails failed"
exit $fails
