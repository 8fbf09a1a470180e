"""Vendor the MNI152 2009c templates the synthetic generator builds its brains from.

The 1 mm ICBM 2009c nonlinear symmetric templates (a skull-stripped T1 and grey- and
white-matter probability maps) come as package data inside nilearn's wheel. This script
reads them from a nilearn wheel file or an installed nilearn, crops them to the brain and
writes `napari_unet/templates/mni152_2009c.npz` (uint8, about 4 MB): nothing is downloaded at
run time. Run once by a maintainer:

    pip download nilearn --no-deps -d /tmp/nilearn && \
        python scripts/make_templates.py /tmp/nilearn/nilearn-*.whl
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

NAMES = {"t1": "t1", "gm": "gm", "wm": "wm"}
MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
OUT = Path(__file__).resolve().parents[1] / "napari_unet" / "templates" / "mni152_2009c.npz"


def read_member(source: Path, name: str) -> nib.Nifti1Image:
    member = MEMBER.format(name)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            raw = gzip.decompress(whl.read(member))
    else:  # an installed nilearn: the folder that holds the `nilearn` package
        raw = gzip.decompress((source / member).read_bytes())
    return nib.Nifti1Image.from_bytes(raw) if hasattr(nib.Nifti1Image, "from_bytes") else nib.load(io.BytesIO(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="nilearn wheel, or the site-packages folder holding nilearn")
    args = parser.parse_args()
    imgs = {k: read_member(args.source, v) for k, v in NAMES.items()}
    data = {k: np.asarray(img.dataobj).astype(np.uint8) for k, img in imgs.items()}
    affine = imgs["t1"].affine
    brain = data["t1"] > 0  # the template is skull-stripped
    lo = np.maximum(np.argwhere(brain).min(0) - 2, 0)
    hi = np.argwhere(brain).max(0) + 3
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    origin = affine[:3, :3] @ lo + affine[:3, 3]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **{k: v[crop] for k, v in data.items()}, origin_mm=origin.astype(np.float32))
    print(f"{OUT}: {data['t1'][crop].shape}, {OUT.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
