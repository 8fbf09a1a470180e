"""`python -m napari_unet ...` (what torchrun runs: `torchrun --nproc_per_node N -m napari_unet train ...`)."""

import sys

from napari_unet.cli import main

sys.exit(main())
