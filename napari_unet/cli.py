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


def _cmd_predict(args) -> int:
    from pathlib import Path

    from napari_unet.cases import find_cases, read_case, write_labels
    from napari_unet.modelfile import load_model
    from napari_unet.predict import Predictor

    loaded = load_model(args.model)
    predictor = Predictor(loaded, args.device, tta=args.tta, batch_size=args.batch_size)
    binary = loaded.metadata["task"] == "binary"
    cases = [c for path in args.cases for c in find_cases(path)]
    out = Path(args.out)
    failures = []
    print(f"{len(cases)} case(s), model {loaded.path.name}, device {predictor.device}", file=sys.stderr)
    for path in cases:
        try:
            case = read_case(path, with_labels=False)
            with progress_bar(case.case_id, "slice") as update:
                prediction = predictor.predict_case(case, progress=update)
            target = write_labels(prediction.labels, case.source, out / f"{case.case_id}.nii.gz", canonical=not binary)
            print(f"{target}  ({prediction.seconds:.1f} s)")
        except NapariUnetError as err:
            if len(cases) == 1:
                raise
            failures.append(str(err))
            print(f"napari-unet predict: error: {err}", file=sys.stderr)
    if failures:
        print(f"napari-unet predict: {len(failures)} of {len(cases)} case(s) failed", file=sys.stderr)
        return 2
    return 0


def _cmd_evaluate(args) -> int:
    import json
    import os
    from pathlib import Path

    from napari_unet.evaluation import evaluate, format_table

    with progress_bar("evaluating", "case") as update:
        result = evaluate(args.pred, args.truth, progress=update)
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
    return 0


def _cmd_info(args) -> int:
    from napari_unet.modelfile import describe, load_model

    loaded = load_model(args.model)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(describe(loaded.metadata, loaded.path))
    print(f"parameters:    {n_params:,}")
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

    p = sub.add_parser("predict", help="propose tumour labels for cases")
    p.add_argument("cases", nargs="+", metavar="CASE", help="case folder or file (any layout), or a folder of cases")
    p.add_argument("--out", required=True, help="output folder: OUT/<case_id>.nii.gz")
    p.add_argument("--model", help="model file (default: the model shipped with napari-unet)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--tta", action="store_true", help="average over flips (4x slower, a little better)")
    p.add_argument("--batch-size", type=int, help="slices per batch (default: from a memory budget)")
    p.set_defaults(run=_cmd_predict)

    p = sub.add_parser("evaluate", help="Dice and HD95 for WT, TC and ET")
    p.add_argument("pred", help="predicted label file, or a folder of <case_id>.nii.gz")
    p.add_argument("truth", help="truth label file, case folder, or a folder of cases")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("info", help="print a model file's metadata")
    p.add_argument("model", nargs="?", help="model file (default: the shipped model)")
    p.set_defaults(run=_cmd_info)

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
