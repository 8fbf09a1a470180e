"""Make the synthetic replay bank that fine-tuning mixes into every batch (training.replay).

    python scripts/make_replay_bank.py [OUT] [--cases 16] [--patches-per-case 8] [--seed 11] [--model M]

The cases come from the same generator and appearance as the shipped default model's training
data (scripts/make_default_model.sh), with a seed of their own; nothing is downloaded. `--model`
records in that model file that the bank is of its training distribution, so that fine-tuning it
(and its fine-tunes) mixes the bank in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from training.replay import make_bank, mark_model, save_bank, shipped_bank_path
    from napari_unet.cases import MODALITIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(shipped_bank_path()))
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--patches-per-case", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--model", help="the model trained on this distribution, to be marked as such")
    args = parser.parse_args()
    images, lo, hi, labels, record = make_bank(
        args.cases, seed=args.seed, patches_per_case=args.patches_per_case,
        progress=lambda i, n: print(f"case {i}/{n}", file=sys.stderr))
    path = save_bank(args.out, images, lo, hi, labels, MODALITIES, record)
    counts = {k: int((labels == k).sum()) for k in range(4)}
    print(f"{path}: {len(labels)} patches, {path.stat().st_size / 2**20:.1f} MB, label voxels {counts}")
    if args.model:
        print(f"{mark_model(args.model)}: marked as trained on the bank's distribution")
    return 0


if __name__ == "__main__":
    sys.exit(main())
