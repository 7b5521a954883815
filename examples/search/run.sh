#!/bin/bash
# The two searches of examples/search/README.md, short (4 epochs a trial) on the CPU, then the files the README
# shows copied next to it. About 5 minutes on 2 idle CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-lightning-reg-search}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny convolutions: threads only add contention
COMMON=(--trainer.max_epochs 4 --trainer.accelerator cpu --trainer.logger false --progress true)

lightning-reg search --config examples/configs/cnn_small_digits.yaml --space examples/search/dropout_grid.yaml \
    --sampler grid --pruner none --output-dir "$OUT/dropout_grid" "${COMMON[@]}"
lightning-reg search --config examples/search/cnn_small_digits_mixup.yaml \
    --space examples/search/regularization_tpe.yaml --sampler tpe --n-trials 8 --seed 0 \
    --output-dir "$OUT/regularization_tpe" "${COMMON[@]}"

for name in dropout_grid regularization_tpe; do
    mkdir -p "examples/search/results/$name"
    cp "$OUT/$name"/{summary.md,trials.csv,best.yaml,*.png} "examples/search/results/$name/"
done
