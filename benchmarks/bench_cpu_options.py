"""Verify, don't assume: fp32 eager against bf16 autocast and torch.compile on this CPU.

    python benchmarks/bench_cpu_options.py
"""

from __future__ import annotations

import time

import torch

from napari_unet.modelfile import load_model
from napari_unet.unet import fuse_batchnorm
from timing import median_time


def timed(fn) -> float:
    return median_time(fn, 5, warmup=True)


def main() -> None:
    model = fuse_batchnorm(load_model().model.eval()).to(memory_format=torch.channels_last)
    x = torch.randn(8, 4, 176, 160).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fp32 = timed(lambda: model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = timed(lambda: model(x))
        contiguous = model.to(memory_format=torch.contiguous_format)
        plain = timed(lambda: contiguous(x.contiguous()))
    print(f"8 slices of 176x160, default model: fp32 channels-last {fp32 * 1000:.0f} ms, "
          f"fp32 contiguous {plain * 1000:.0f} ms ({plain / fp32:.2f}x), bf16 autocast {bf16 * 1000:.0f} ms ({bf16 / fp32:.2f}x)")
    try:
        compiled = torch.compile(model.to(memory_format=torch.channels_last))
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - t0
            comp = timed(lambda: compiled(x))
        print(f"torch.compile: {comp * 1000:.0f} ms ({comp / fp32:.2f}x), after {compile_s:.0f} s of compiling")
    except Exception as err:  # noqa: BLE001  (a missing compiler is a result too)
        print(f"torch.compile failed here: {type(err).__name__}: {str(err).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()
