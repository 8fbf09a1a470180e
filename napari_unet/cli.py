"""The `napari-unet` command: one entry point for every job, calling the same functions as the widget."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from napari_unet import NapariUnetError, __version__


@contextmanager
def progress_bar(desc: str, unit: str = "it"):
    """A tqdm bar fed by the (done, total) progress callbacks of the core functions."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def update(done: int, total: int, **postfix) -> None:
        bar.total = total
        bar.n = done
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _cmd_synth(args) -> int:
    from napari_unet.synth import write_dataset

    with progress_bar("synthesising", "case") as update:
        paths = write_dataset(
            args.out,
            args.cases,
            seed=args.seed,
            layout=args.layout,
            shift=args.shift,
            shape=tuple(args.shape),
            start=args.start,
            progress=update,
        )
    print(f"wrote {len(paths)} {args.layout} case(s) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-unet",
        description="Human-in-the-loop brain-tumour segmentation: synthesise, predict, evaluate, train, annotate.",
    )
    parser.add_argument("--version", action="version", version=f"napari-unet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic BraTS-like cases")
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["brats2020", "brats2021", "brats2023", "msd"], default="brats2021")
    p.add_argument(
        "--shift", type=float, default=0.0,
        help="scanner shift of the appearance, 0 (training look) to 1 (a different scanner)",
    )
    p.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155), metavar=("X", "Y", "Z"),
                   help="voxels per axis (default BraTS 240 240 155; smaller is a coarser grid)")
    p.add_argument("--start", type=int, default=1, help="number of the first case")
    p.set_defaults(run=_cmd_synth)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except NapariUnetError as err:
        print(f"napari-unet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-unet {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
