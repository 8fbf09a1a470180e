"""Fine-tune round cost: seconds and peak resident memory of `napari-unet finetune` in a fresh
process, on a store of 2 full-size cases of another scanner with 10 reviewed slices in all.

    python benchmarks/bench_finetune.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_unet.cases import read_case
from napari_unet.synth import write_dataset


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for path in write_dataset(store, 2, seed=300, shift=1.0):
            case = read_case(path)
            tumour = np.flatnonzero(case.labels.any(axis=(1, 2)))
            picked = tumour[:: max(1, len(tumour) // 5)][:5]
            (path / "corrections.json").write_text(json.dumps({"reviewed_slices": [int(z) for z in picked]}))
        code = (
            "from napari_unet.cli import main; import sys; "
            f"code = main(['finetune', {str(store)!r}, '--out', {str(Path(tmp) / 'new.safetensors')!r}, '--device', 'cpu']); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); sys.exit(code)"
        )
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        peak_gb = int(proc.stdout.strip().splitlines()[-1]) / 2**20
        print(proc.stdout.strip().splitlines()[0])
        print(f"fine-tune on 10 reviewed slices: {seconds:.1f} s for the whole command (target 30 s), "
              f"peak resident memory {peak_gb:.2f} GB (target 3 GB)")


if __name__ == "__main__":
    main()
