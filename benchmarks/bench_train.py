"""Training at scale, measured on full-size synthetic cases: the preprocessed cache, loading from
it, training speed, the memory of the whole process tree, and the projection for BraTS 2021.

    python benchmarks/bench_train.py [--cases 40] [--steps 300]

Prints, with the CPU it ran on:
- cache size per case and prepare time per case (target: <= 10 MB a case; BraTS 2021 on 4
  cores well inside an hour);
- patches (slices) per second read from the cache with 0, 1 and 2 DataLoader workers;
- training steps per second of the default architecture on this CPU;
- peak memory of the whole process tree (PSS, so memory shared with the workers counts once)
  while `napari-unet train` runs with 6, 10, 24 and 40 cases (target: +150 MB at most from 6 to
  24, under 4 GB);
- validation Dice after the same steps from the cache and from the NIfTI files (target: within
  0.01);
- the T4 projection: its slice rate estimated from the network's FLOPs, against the loading rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from timing import seconds
from napari_unet.cases import MODALITIES
from napari_unet.modelfile import make_metadata
from napari_unet.preprocess import Normalisation
from napari_unet.synth import write_dataset
from napari_unet.unet import UNet, UNetConfig
from training.cache import prepare_cache
from training.data import PatchDataset, load_root, split_validation
from training.loop import Settings, patch_loader, run, validate

DEFAULT_NET = UNetConfig(base_channels=16, depth=4, padding="same", norm="batch")  # the shipped architecture
PATCH, BATCH = 128, 8
BRATS2021_CASES = 1251
# An NVIDIA T4: 65 TFLOP/s fp16 tensor-core peak, of which cuDNN reaches about a third on
# convolutions like these; 320 GB/s of memory bandwidth, about 70% of it reached. A training
# step of a thin U-Net is bound by whichever is slower (a roofline). No T4 was at hand: the
# estimate is only as good as these two fractions.
T4_FP16_PEAK, T4_ACHIEVED_FRACTION = 65e12, 1 / 3
T4_BANDWIDTH, T4_BANDWIDTH_FRACTION = 320e9, 0.7


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            bf16 = "native bf16 (avx512_bf16)" if "avx512_bf16" in flags else "no native bf16"
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, {bf16}"
    return platform.processor()


def tree_pss(proc: psutil.Process) -> int:
    """Proportional set size of a process and its children: shared pages count once in all."""
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def peak_train_memory(data: Path, cache: Path, out: Path, steps: int) -> float:
    """Peak PSS (GB) of `napari-unet train` over a prepared cache, workers included."""
    cmd = [sys.executable, "-m", "napari_unet", "train", str(data), "--out", str(out), "--cache", str(cache),
           "--steps", str(steps), "--val-every", str(steps), "--val-fraction", "0.1", "--batch-size", str(BATCH),
           "--patch", str(PATCH), "--workers", "2", "--device", "cpu", "--checkpoint-every", str(steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(ps))
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(proc.stderr.read()[-2000:])
    return peak / 2**30


def loading_rate(cases, workers: int, batches: int = 30) -> float:
    """Patches per second from the cache through the DataLoader, data loading alone."""
    loader = patch_loader(PatchDataset(cases, PATCH, seed=0), 0, batches + 2, BATCH, workers, pin=False)
    it = iter(loader)
    next(it), next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - start)


def train_cost_per_slice(config: UNetConfig) -> tuple[float, float]:
    """(FLOPs, bytes of fp16 activation traffic) of one training slice, forward and backward.

    Every activation is written in the forward pass, read back in the backward pass, and its
    gradient written and read once: four passes over the forward activations.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(config)
    x = torch.randn(1, config.in_channels, PATCH, PATCH)
    elements = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: elements.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    for h in hooks:
        h.remove()
    return counter.get_total_flops(), 4 * 2 * sum(elements)


def t4_slices_per_second(config: UNetConfig) -> tuple[float, float, float]:
    flops, traffic = train_cost_per_slice(config)
    seconds = max(flops / (T4_FP16_PEAK * T4_ACHIEVED_FRACTION), traffic / (T4_BANDWIDTH * T4_BANDWIDTH_FRACTION))
    return 1 / seconds, flops, traffic


def cache_vs_nifti(root: Path, cache: Path, steps: int) -> tuple[dict, dict]:
    """Validation Dice after `steps` steps from the cache and from the NIfTI files (in memory)."""
    config = UNetConfig(base_channels=8, depth=3, padding="same", norm="batch")
    settings = dict(steps=steps, batch_size=8, patch=96, lr=3e-3, seed=0, device="cpu", warmup=20)
    cached = prepare_cache(root, cache, MODALITIES, Normalisation())
    memory = load_root(root, MODALITIES, Normalisation())
    results = []
    for cases in (cached, memory):
        train_cases, _ = split_validation(cases, 0.25, 0)
        _, val_cases = split_validation(memory, 0.25, 0)  # both judged on the same NIfTI volumes
        torch.manual_seed(0)
        model = UNet(config)
        run(model, make_metadata(config), train_cases, Settings(**settings))
        model.eval()
        results.append(validate(model, make_metadata(config), val_cases, "cpu"))
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300, help="steps of the cache-versus-NIfTI comparison")
    parser.add_argument("--memory-steps", type=int, default=12, help="steps of each memory run")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = seconds(lambda: write_dataset(tmp / "all", args.cases, seed=500))
        print(f"synthesised {args.cases} full-size cases in {t:.0f} s")
        cases_dirs = sorted((tmp / "all").iterdir())

        cache = tmp / "cache"
        prepare_s = seconds(lambda: prepare_cache(tmp / "all", cache, MODALITIES, Normalisation()))
        cores = os.cpu_count() or 1
        per_case_core = prepare_s * cores / args.cases
        size = sum(f.stat().st_size for f in (cache / "cases").iterdir()) / args.cases
        print(f"cache: {size / 1e6:.1f} MB per case (target <= 10); prepare {prepare_s / args.cases:.2f} s per case "
              f"with {cores} processes, {per_case_core:.1f} core-seconds per case")
        print(f"  BraTS 2021 ({BRATS2021_CASES} cases): {size * BRATS2021_CASES / 1e9:.1f} GB of cache, "
              f"prepare about {per_case_core * BRATS2021_CASES / 4 / 60:.0f} min on 4 cores (Kaggle)")

        cases = prepare_cache(tmp / "all", cache, MODALITIES, Normalisation())
        rates = {w: loading_rate(cases, w) for w in (0, 1, 2)}
        print("loading from the cache (patches/s): " + ", ".join(f"{w} workers {r:.0f}" for w, r in rates.items()))

        torch.manual_seed(0)
        model = UNet(DEFAULT_NET)
        warm = Settings(steps=2, batch_size=BATCH, patch=PATCH, device="cpu", warmup=1)
        run(model, make_metadata(DEFAULT_NET), cases, warm)
        timed = Settings(steps=10, batch_size=BATCH, patch=PATCH, device="cpu", warmup=1, workers=1)
        step_s = seconds(lambda: run(UNet(DEFAULT_NET), make_metadata(DEFAULT_NET), cases, timed)) / timed.steps
        print(f"training on this CPU (16 channels, depth 4, batch {BATCH} of {PATCH}x{PATCH}): "
              f"{1 / step_s:.2f} steps/s, {BATCH / step_s:.1f} slices/s")

        for n in (6, 10, 24, args.cases):
            if n > args.cases:
                continue
            subset = tmp / f"subset{n}"
            subset.mkdir()
            for d in cases_dirs[:n]:
                (subset / d.name).symlink_to(d)
            gb = peak_train_memory(subset, cache, tmp / f"m{n}.safetensors", args.memory_steps)
            print(f"training memory, {n} cases: peak {gb:.2f} GB for the process tree (PSS, 2 loader workers)")

        per_worker = max(rates[1], rates[2] / 2)
        kaggle_loading = 3 * per_worker
        print(f"loading with 3 workers (Kaggle: 4 cores) ~ 3 x {per_worker:.0f} = {kaggle_loading:.0f} patches/s "
              "(per-worker rate of this CPU)")
        for width in (16, 32):
            config = UNetConfig(base_channels=width, depth=4, padding="same", norm="batch")
            t4_rate, flops, traffic = t4_slices_per_second(config)
            print(f"T4 estimate, {width} channels: {flops / 1e9:.1f} GFLOP and {traffic / 1e6:.0f} MB of activation "
                  f"traffic per training slice ({PATCH}x{PATCH}); max({flops / 1e9:.1f} GFLOP / "
                  f"{T4_FP16_PEAK * T4_ACHIEVED_FRACTION / 1e12:.0f} TFLOP/s, {traffic / 1e6:.0f} MB / "
                  f"{T4_BANDWIDTH * T4_BANDWIDTH_FRACTION / 1e9:.0f} GB/s) = {1e3 / t4_rate:.2f} ms: "
                  f"{t4_rate:.0f} slices/s per T4, {2 * t4_rate:.0f} on two")
            print(f"  loading / consumption on T4 x2: {kaggle_loading / (2 * t4_rate):.2f}x (target >= 3x); "
                  f"BraTS 2021 epoch of ~{BRATS2021_CASES * 140:,} slices: "
                  f"{BRATS2021_CASES * 140 / min(2 * t4_rate, kaggle_loading) / 60:.1f} min")
        print(f"this CPU, 16 channels: BraTS 2021 epoch {BRATS2021_CASES * 140 * step_s / BATCH / 3600:.1f} h")

        sub = tmp / "subset10" if (tmp / "subset10").exists() else tmp / "all"
        from_cache, from_nifti = cache_vs_nifti(sub, tmp / "cache_cmp", args.steps)
        diffs = {r: abs(from_cache[r] - from_nifti[r]) for r in from_cache}
        print(f"validation Dice after {args.steps} steps: from the cache {_fmt(from_cache)}, "
              f"from NIfTI {_fmt(from_nifti)}; largest difference {max(diffs.values()):.3f} (target <= 0.01)")


def _fmt(scores: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in scores.items())


if __name__ == "__main__":
    main()
