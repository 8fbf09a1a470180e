#!/usr/bin/env bash
# The recipe of the shipped default model: synthetic BraTS-like cases (standard appearance),
# a 16-channel 2D U-Net with modality dropout (any set of modalities works), 1200 steps on the
# CPU (about 4 minutes of training on 2 cores, after preparing the cache).
# Usage: scripts/make_default_model.sh [DATA_DIR] [OUT]
set -euo pipefail
data=${1:-data/synth_train}
out=${2:-napari_unet/models/default.safetensors}
[ -d "$data" ] || napari-unet synth "$data" --cases 40 --seed 1 --layout brats2021 --shift 0
napari-unet train "$data" --out "$out" --steps 1200 --val-fraction 0.1 --val-every 300 \
    --checkpoint-every 300 --base-channels 16 --depth 4 --padding same --norm batch \
    --batch-size 8 --patch 128 --lr 0.002 --seed 0 --device cpu --modality-dropout 0.3
napari-unet info "$out"
