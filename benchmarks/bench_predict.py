"""Proposal speed, efficiency and memory on this machine, beside its own matmul rate and a peer.

Prints, for the shipped default model (16 channels) and the paper-size U-Net (64 channels):
- seconds for a whole 240x240x155 case from the loaded volume to the mask, and end to end
  from the four files on disk to the written mask (median of --repeat runs);
- one slice (what the widget's "This slice" costs);
- the network's achieved GFLOP/s against this machine's fp32 matmul and dense-conv rates,
  measured in the same run;
- the peer: MONAI's SliceInferer (sliding_window_inference slice by slice) with the same
  network on the same case, and the ratio;
- the peak resident memory of an end-to-end proposal (a fresh process).

    python benchmarks/bench_predict.py [--repeat 3] [--skip-paper]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from napari_unet.cases import read_case, write_labels
from napari_unet.modelfile import LoadedModel, default_model_path, load_model, make_metadata
from napari_unet.predict import Predictor
from napari_unet.synth import write_dataset
from napari_unet.unet import UNet, UNetConfig, forward_padded
from timing import median_time


def matmul_gflops(repeat: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = median_time(lambda: a @ b, repeat * 3)
    return 2 * 2048**3 / t / 1e9


def conv_gflops(repeat: int) -> float:
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(4, 64, 176, 176).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv(x)
        t = median_time(lambda: conv(x), repeat * 2)
    return 2 * 64 * 64 * 9 * 4 * 176 * 176 / t / 1e9


def network_flops(model: UNet, plane: tuple[int, int], n_slices: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.config.in_channels, *plane)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        forward_padded(model.eval(), x)
    return counter.get_total_flops() * n_slices


def monai_peer_seconds(model: UNet, stack: np.ndarray, repeat: int) -> float:
    """MONAI's way: normalise the whole volume, run every slice through the 2D net."""
    from monai.inferers import SliceInferer
    from monai.transforms import NormalizeIntensity

    model = model.eval()
    norm = NormalizeIntensity(nonzero=True, channel_wise=True)
    m = 2 ** model.config.depth
    roi = tuple(int(np.ceil(s / m) * m) for s in stack.shape[2:])
    inferer = SliceInferer(roi_size=roi, sw_batch_size=8, spatial_dim=0, progress=False)

    def run():
        vol = norm(torch.from_numpy(stack))[None]  # (1, C, Z, Y, X)
        with torch.inference_mode():
            logits = inferer(vol, model)
        return logits.argmax(1)

    return median_time(run, repeat)


def rss_child(model: str, case: str, out: str) -> float:
    """Peak resident memory (GB) of a fresh process doing one end-to-end proposal."""
    code = (
        "from napari_unet.cli import main; "
        f"main(['predict', {case!r}, '--out', {out!r}, '--model', {model!r}, '--device', 'cpu']); "
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )  # VmHWM, not ru_maxrss: the latter is inherited from this (large) parent across fork and exec
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1]) / 2**20  # kB -> GB


def bench_model(name: str, loaded: LoadedModel, case_path: Path, repeat: int, peaks: dict, work: Path) -> dict:
    case = read_case(case_path)
    predictor = Predictor(loaded, "cpu")
    volume = predictor.prepare_case(case)
    predictor.predict(volume)  # warm-up
    n = len(volume.brain_slices())
    from_volume = median_time(lambda: predictor.predict(predictor.prepare_case(case)), repeat)

    def end_to_end():
        c = read_case(case_path, with_labels=False)
        write_labels(predictor.predict_case(c).labels, c.source, work / f"{name}.nii.gz")

    e2e = median_time(end_to_end, repeat)
    z = int(volume.brain_slices()[len(volume.brain_slices()) // 2])
    one_slice = median_time(lambda: predictor.predict(volume, slices=[z]), repeat * 5)
    network_only = median_time(lambda: predictor.predict(volume), repeat)
    flops = network_flops(loaded.model, volume.crop.shape[2:], n)
    peer = monai_peer_seconds(loaded.model, case.stack(loaded.modalities), repeat)
    rss = rss_child(str(loaded.path), str(case_path), str(work / "rss"))
    return {
        "model": name, "slices": n, "crop": volume.crop.shape[2:], "from_volume_s": from_volume, "end_to_end_s": e2e,
        "one_slice_ms": one_slice * 1000, "gflops": flops / network_only / 1e9,
        "pct_matmul": 100 * flops / network_only / 1e9 / peaks["matmul"],
        "pct_conv": 100 * flops / network_only / 1e9 / peaks["conv"], "peer_s": peer,
        "ratio": from_volume / peer, "rss_gb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-paper", action="store_true", help="only the default model")
    args = parser.parse_args()

    from napari_unet.predict import cpu_has_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"native bf16: {cpu_has_bf16()} (the engine's precision: {'bf16' if cpu_has_bf16() else 'fp32'})")
    peaks = {"matmul": matmul_gflops(args.repeat), "conv": conv_gflops(args.repeat)}
    print(f"this machine: fp32 matmul {peaks['matmul']:.0f} GFLOP/s, dense 3x3 conv (64 ch) {peaks['conv']:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        case_path = write_dataset(work / "data", 1, seed=7)[0]
        models = [("default (16 ch)", load_model(default_model_path()))]
        if not args.skip_paper:
            config = UNetConfig(base_channels=64, depth=4, padding="same", norm="batch")
            paper = UNet(config).eval()
            from napari_unet.modelfile import save_model

            path = save_model(paper, make_metadata(config), work / "paper.safetensors")
            models.append(("paper size (64 ch)", load_model(path)))
        rows = [bench_model(name, loaded, case_path, args.repeat, peaks, work) for name, loaded in models]
    print()
    header = (f"{'model':<20}{'slices':>7}{'volume s':>10}{'e2e s':>8}{'slice ms':>10}{'GFLOP/s':>9}"
              f"{'% matmul':>10}{'% conv':>8}{'MONAI s':>9}{'ratio':>7}{'peak GB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<20}{r['slices']:>7}{r['from_volume_s']:>10.2f}{r['end_to_end_s']:>8.2f}"
              f"{r['one_slice_ms']:>10.0f}{r['gflops']:>9.0f}{r['pct_matmul']:>9.0f}%{r['pct_conv']:>7.0f}%{r['peer_s']:>9.2f}"
              f"{r['ratio']:>7.2f}{r['rss_gb']:>9.2f}")
    print("\nvolume s: loaded volume -> mask; e2e s: four files on disk -> written mask; ratio: ours / MONAI")


if __name__ == "__main__":
    main()
