#!/usr/bin/env bash
# The recipe of the shipped default model: 64 synthetic cases built on the MNI152 anatomy with
# grown tumours and randomised appearance (domain randomisation), a 16-channel 2D U-Net with
# modality dropout (any set of modalities works), trained on the CPU (2 cores: about 12 minutes
# to synthesise and prepare, then about 3-4 steps a second: 3500 steps in about 15-25 minutes);
# then the synthetic replay bank that fine-tuning mixes in (the same generator, its own seed).
# Usage: scripts/make_default_model.sh [DATA_DIR] [OUT] [STEPS]
set -euo pipefail
data=${1:-data/realistic_train}
out=${2:-napari_unet/models/default.safetensors}
steps=${3:-3500}
if [ ! -d "$data" ]; then  # two processes, one per core
    napari-unet synth "$data" --cases 32 --seed 7 --appearance random --start 1 &
    napari-unet synth "$data" --cases 32 --seed 7 --appearance random --start 33 &
    wait
fi
napari-unet train "$data" --out "$out" --steps "$steps" --val-fraction 0.1 --val-every 500 \
    --checkpoint-every 250 --base-channels 16 --depth 4 --padding same --norm batch \
    --batch-size 8 --patch 128 --lr 0.002 --seed 0 --device cpu --modality-dropout 0.3
napari-unet info "$out"
python "$(dirname "$0")/make_replay_bank.py" "$(dirname "$out")/synthetic_replay.npz" --cases 16 --patches-per-case 8 \
    --seed 11 --model "$out"
