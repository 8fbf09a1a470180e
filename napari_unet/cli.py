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


@contextmanager
def ctrl_c_stops_at_next_step(enabled: bool = True):
    """Yields `cancelled()`: the first Ctrl-C asks the job to stop at its next step, where it
    writes nothing half done; a second one interrupts at once. A KeyboardInterrupt raised at any
    bytecode can land inside tqdm's write lock and hang the bar's close. Off under torchrun (the
    ranks would stop at different steps and wait on each other forever)."""
    import signal
    import threading

    pressed = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield pressed.is_set
        return

    def on_ctrl_c(signum, frame):
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _whole(low: int):
    """An argparse type: a whole number >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text) if text.replace(".", "", 1).isdigit() else -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to below 1, not {text}")
    return value


def _share(text: str) -> float:
    value = float(text) if text.replace(".", "", 1).isdigit() else -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, not {text}")
    return value


def _writable_from(path, candidates, what: str) -> None:
    """The nearest existing folder among `candidates` is where `path` will be made: it must be writable."""
    import os

    existing = next(p for p in candidates if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise NapariUnetError(f"{path}: no permission to write {what} there ({existing})")


def _output_file(path, what: str = "output"):
    """The file a command will write: not a folder, in a folder it can write into."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise NapariUnetError(f"{path}: is a folder; the {what} must be a file name")
    _writable_from(path, path.parents, f"the {what}")  # the folders are made when the file is written
    return path


def _output_folder(path):
    from pathlib import Path

    from napari_unet.atomic import SHARED_FOLDER_GRACE_S, remove_stale_partials

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NapariUnetError(f"{path}: is a file; --out must be a folder")
    _writable_from(path, (path, *path.parents), "the outputs")  # made when the first file is written
    remove_stale_partials(path, SHARED_FOLDER_GRACE_S)  # left by a run that was killed while writing
    return path


def _wrote(path, existed: bool) -> str:
    return f"wrote {path}" + (" (replacing the file that was there)" if existed else "")


def _cmd_synth(args) -> int:
    from napari_unet.synth import write_dataset

    with progress_bar("synthesising", "case") as update:
        paths = write_dataset(
            args.out,
            args.cases,
            seed=args.seed,
            layout=args.layout,
            shift=args.shift,
            appearance=args.appearance,
            shape=tuple(args.shape),
            start=args.start,
            progress=update,
        )
    print(f"wrote {len(paths)} {args.layout} case(s) to {args.out}")
    return 0


def _cmd_predict(args) -> int:
    from napari_unet.cases import find_cases, read_case, write_labels
    from napari_unet.modelfile import load_model
    from napari_unet.predict import DEFAULT_POSTPROCESSING, Predictor

    loaded = load_model(args.model)
    predictor = Predictor(loaded, args.device, tta=args.tta, batch_size=args.batch_size, precision=args.precision,
                          postprocess=None if args.no_postprocess else DEFAULT_POSTPROCESSING)
    binary = loaded.metadata["task"] == "binary"
    cases = [c for path in args.cases for c in find_cases(path)]
    out = _output_folder(args.out)
    failures = []
    print(f"{len(cases)} case(s), model {loaded.path.name}, device {predictor.device}, {predictor.precision}",
          file=sys.stderr)
    for path in cases:
        try:
            case = read_case(path, with_labels=False)
            for warning in case.warnings:
                print(f"napari-unet predict: warning: {warning}", file=sys.stderr)
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

    from napari_unet.atomic import write_text
    from napari_unet.evaluation import evaluate, format_table

    json_out = _output_file(args.json, "--json file") if args.json else None
    with progress_bar("evaluating", "case") as update:
        result = evaluate(args.pred, args.truth, progress=update)
    print(format_table(result))
    if json_out:
        write_text(json_out, json.dumps(result, indent=2))
    return 0


def _cmd_info(args) -> int:
    from napari_unet.modelfile import describe, load_model

    loaded = load_model(args.model)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(describe(loaded.metadata, loaded.path))
    print(f"parameters:    {n_params:,}")
    return 0


def _settings(args, base):
    """`base` (training.loop.Settings) with the options given on the command line."""
    return base.updated(**vars(args))


def _cmd_train(args) -> int:
    from napari_unet.unet import UNetConfig
    from training.loop import ddp_info, train

    if not args.data and not args.cache:
        raise NapariUnetError("give the data to train on, or a prepared --cache")
    out = _output_file(args.out, "model file")
    existed = out.exists() and not args.resume
    _, rank, _, _ = ddp_info()
    try:
        config = UNetConfig(base_channels=args.base_channels, depth=args.depth, padding=args.padding, norm=args.norm)
    except ValueError as err:
        raise NapariUnetError(f"the network asked for: {err}") from None
    from training.loop import Settings

    settings = _settings(args, Settings(checkpoint_every=100))
    if args.epochs is not None:  # an epoch is --steps-per-epoch steps, validated at its end
        settings.steps = args.epochs * args.steps_per_epoch
        settings.val_every = args.steps_per_epoch
    elif args.val_every is None:
        settings.val_every = max(1, settings.steps // 10)
    master = rank == 0
    is_ddp = ddp_info()[0]
    with ctrl_c_stops_at_next_step(not is_ddp) as cancelled, \
            progress_bar("loading cases", "case") as load_update, progress_bar("training", "step") as update:
        result = train(
            args.data, args.out, settings=settings, config=config, task=args.task,
            val_fraction=args.val_fraction, resume=args.resume, cache=args.cache, prepare_workers=args.prepare_workers,
            progress=update if master else None, load_progress=load_update if master else None,
            cancel=None if is_ddp else cancelled, log=(lambda msg: print(msg, file=sys.stderr)) if master else None,
        )
    if master:
        print(f"{_wrote(result.path, existed)} after {result.steps} steps in {result.seconds:.0f} s; "
              f"validation Dice {result.metadata['training'].get('validation_dice')}")
    return 0


def _cmd_prepare(args) -> int:
    from napari_unet.modelfile import load_model
    from napari_unet.preprocess import Normalisation
    from training.cache import prepare_cache

    if args.model:
        loaded = load_model(args.model)
        modalities, norm = loaded.modalities, Normalisation.from_dict(loaded.metadata["normalisation"])
    else:
        from napari_unet.cases import MODALITIES

        modalities, norm = MODALITIES, Normalisation()
    verification, sources = _verify_for_repair(args, modalities, norm) if args.verify else (None, {})
    with progress_bar("preparing", "case") as update:
        # The damaged cases' sources go along, for a case whose data lies outside the roots given.
        cases = prepare_cache([*args.data, *sources.values()], args.cache, modalities, norm, workers=args.workers,
                              progress=update, log=lambda msg: print(msg, file=sys.stderr))
    print(f"{len(cases)} case(s) ready in {args.cache}")
    if verification is None:
        return 0
    return _report_verification(verification, sources, {c.case_id for c in cases})


def _verify_for_repair(args, modalities, norm):
    """--verify: check every cached case, and discard the damaged ones whose data is still there
    so that preparing makes them again; returns (what was found, case id -> source to prepare)."""
    from training.cache import discard_case, repair_sources, verify_cache

    verification = verify_cache(args.cache, modalities, norm)
    sources = repair_sources(verification.damaged, args.data)
    for case_id in sources:
        discard_case(args.cache, case_id)
    return verification, sources


def _report_verification(verification, sources: dict, ready: set) -> int:
    """One line per damaged case and a summary; 1 when damage remains."""
    remaining = 0
    for damage in verification.damaged:
        if damage.case_id in sources and damage.case_id in ready:
            outcome = f"re-prepared from {sources[damage.case_id]}"
        elif damage.case_id in sources:
            outcome = f"NOT repaired: preparing it again from {sources[damage.case_id]} failed (see above)"
        else:
            outcome = "NOT repaired: its data is gone (give the folder holding it, or delete its files to drop it)"
        remaining += outcome.startswith("NOT")
        print(f"damaged: {damage} -> {outcome}")
    found = len(verification.damaged)
    summary = f"verified {verification.checked} cases: " + (
        "none damaged" if not found else f"{found} damaged, re-prepared" if not remaining
        else f"{found} damaged, {found - remaining} re-prepared, {remaining} not repaired")
    if verification.unchecksummed:
        summary += (f"; {len(verification.unchecksummed)} cached before checksums: decompressed whole, "
                    "their content cannot be checked")
    print(summary)
    return 1 if remaining else 0


def _cmd_finetune(args) -> int:
    from training.loop import FINETUNE, finetune

    existed = _output_file(args.out, "model file").exists()
    with ctrl_c_stops_at_next_step() as cancelled, progress_bar("fine-tuning", "step") as update:
        result = finetune(
            args.store, args.model, args.out,
            settings=_settings(args, FINETUNE),
            replay=args.replay, progress=update, cancel=cancelled,
        )
    note = " (stopped early: no more improvement)" if result.stopped_early else ""
    print(f"{_wrote(result.path, existed)} after {result.steps} steps in {result.seconds:.1f} s{note}")
    return 0


def _cmd_cases(args) -> int:
    from napari_unet.dataset import format_table, list_dataset, next_case, score_cases

    entries = list_dataset(args.dataset, args.store)
    print(format_table(entries))
    if args.next:
        scores = None
        if args.next == "uncertainty":
            with progress_bar("scoring cases not started", "case") as update:
                scores = score_cases(entries, args.model, device=args.device, progress=update,
                                     log=lambda msg: print(f"napari-unet cases: {msg}", file=sys.stderr))
        chosen = next_case(entries, args.next, args.after, scores)
        if chosen is None:
            print("next: none (every case is done)")
        else:
            score = f", uncertainty {scores[chosen.case_id]:.3f}" if scores and chosen.case_id in scores else ""
            print(f"next: {chosen.case_id} ({chosen.status}{score})  {chosen.path}")
    return 0


def _cmd_report(args) -> int:
    from napari_unet.report import format_table, report, write_csv

    csv_out = _output_file(args.csv, "--csv file") if args.csv else None  # refused before any case is read
    with progress_bar("reading labels", "case") as update:
        rows = report(args.paths, args.reference, progress=update)
    print(format_table(rows))
    if csv_out:
        existed = csv_out.exists()
        write_csv(rows, csv_out)
        print(_wrote(csv_out, existed))
    return 0


def _cmd_annotate(args) -> int:
    from napari_unet.app import run_app

    return run_app(args.case, model=args.model, device=args.device)


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Options several commands share, defined once."""
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="model file (default: the model shipped with napari-unet)")
    optimiser = argparse.ArgumentParser(add_help=False)
    optimiser.add_argument("--batch-size", type=_whole(1))
    optimiser.add_argument("--lr", type=_positive_float)
    optimiser.add_argument("--seed", type=_whole(0))
    return {"device": device, "model": model, "optimiser": optimiser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-unet",
        description="Human-in-the-loop brain-tumour segmentation: synthesise, predict, evaluate, train, annotate.",
    )
    parser.add_argument("--version", action="version", version=f"napari-unet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = _parents()

    p = sub.add_parser("synth", help="write synthetic BraTS-like cases")
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=_whole(1), default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=_whole(0), default=0)
    p.add_argument("--layout", choices=["brats2020", "brats2021", "brats2023", "msd"], default="brats2021")
    p.add_argument(
        "--shift", type=float, default=0.0,
        help="scanner shift of the standard appearance, 0 (training look) to 1 (a different scanner)",
    )
    p.add_argument(
        "--appearance", choices=["standard", "random"], default="standard",
        help="standard: one look per contrast; random: every tissue's brightness, bias, noise, blur and "
             "slice thickness drawn per case (domain randomisation, what the default model trains on)",
    )
    p.add_argument("--shape", type=_whole(8), nargs=3, default=(240, 240, 155), metavar=("X", "Y", "Z"),
                   help="voxels per axis (default BraTS 240 240 155; smaller is a coarser grid)")
    p.add_argument("--start", type=_whole(0), default=1, help="number of the first case")
    p.set_defaults(run=_cmd_synth)

    p = sub.add_parser("predict", help="propose tumour labels for cases", parents=[shared["model"], shared["device"]])
    p.add_argument("cases", nargs="+", metavar="CASE", help="case folder or file (any layout), or a folder of cases")
    p.add_argument("--out", required=True, help="output folder: OUT/<case_id>.nii.gz")
    p.add_argument("--tta", action="store_true", help="average over flips (4x slower, a little better)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="the network's labels as they are (default: small islands and pieces of bare "
                        "necrotic core away from the tumour removed, an enhancing region under 0.5 mL "
                        "called core)")
    p.add_argument("--batch-size", type=_whole(1), help="slices per batch (default: from a memory budget)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp16 on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16, AMX), else fp32")
    p.set_defaults(run=_cmd_predict)

    p = sub.add_parser("evaluate", help="Dice and HD95 for WT, TC and ET")
    p.add_argument("pred", help="predicted label file, or a folder of <case_id>.nii.gz")
    p.add_argument("truth", help="truth label file, case folder, or a folder of cases")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("info", help="print a model file's metadata")
    p.add_argument("model", nargs="?", help="model file (default: the shipped model)")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("prepare", help="preprocess BraTS roots once into a training cache (resumable)")
    p.add_argument("data", nargs="+", help="BraTS root folders (any layout; several are merged, each patient once)")
    p.add_argument("--cache", required=True, help="cache folder (made if missing; an interrupted run goes on)")
    p.add_argument("--workers", type=_whole(1), help="processes (default: one per CPU core)")
    p.add_argument("--model", help="prepare for this model's modalities and normalisation (default: a new model's)")
    p.add_argument("--verify", action="store_true",
                   help="first check every cached case against its checksum, and prepare the damaged ones again "
                        "from their data; exit status 1 when damage remains")
    p.set_defaults(run=_cmd_prepare)

    p = sub.add_parser("train", help="train a model on BraTS roots (torchrun for several GPUs)",
                       parents=[shared["optimiser"], shared["device"]])
    p.add_argument("data", nargs="*", help="BraTS root folders (any layout), every slice trusted; "
                                           "none: every case of the prepared --cache")
    p.add_argument("--cache", help="preprocessed cache folder (default: OUT.cache beside the model); "
                                   "made or completed first, see `prepare`")
    p.add_argument("--prepare-workers", type=_whole(1), help="processes preparing the cache (default: one per core)")
    p.add_argument("--workers", type=_whole(0),
                   help="DataLoader processes making patches (default 0; 3 on a 4-core GPU box)")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 with loss scaling on GPUs before Ampere (T4), bf16 on newer ones, fp32 on the CPU")
    p.add_argument("--out", required=True, help="model file to write (.safetensors); a checkpoint goes beside it")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_whole(1), help="optimiser steps (default 1000)")
    length.add_argument("--epochs", type=_whole(1), help="epochs of --steps-per-epoch steps, validating after each")
    p.add_argument("--steps-per-epoch", type=_whole(1), default=100)
    p.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of cases held out for validation")
    p.add_argument("--val-every", type=_whole(0),
                   help="steps between validations (default: a tenth of the steps; 0: only once, at the end)")
    p.add_argument("--checkpoint-every", type=_whole(1), help="steps between checkpoints (default 100)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--task", choices=["multiclass", "binary"], default="multiclass")
    p.add_argument("--base-channels", type=_whole(1), default=16, help="width (the paper: 64)")
    p.add_argument("--depth", type=_whole(1), default=4, help="number of poolings (the paper: 4)")
    p.add_argument("--padding", choices=["same", "valid"], default="same")
    p.add_argument("--norm", choices=["none", "batch", "instance"], default="batch")
    p.add_argument("--patch", type=_whole(16), help="training patch size in pixels (default 128)")
    p.add_argument("--modality-dropout", type=_fraction,
                   help="chance of hiding each modality of a training patch (default 0); above 0 the model "
                        "works with any set of modalities")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a model on the reviewed slices of a corrections store",
                       parents=[shared["optimiser"], shared["device"]])
    p.add_argument("store", help="corrections store: case folders with corrections.json")
    p.add_argument("--model", help="base model (default: the shipped model); never modified")
    p.add_argument("--out", required=True, help="the new model file")
    p.add_argument("--steps", type=_whole(1), help="at most this many steps (default 60; stops early)")
    p.add_argument("--replay", help="a BraTS root mixed in so the model does not forget (default: the base "
                                    "model's labels on the store's unreviewed slices)")
    p.add_argument("--modality-dropout", type=_fraction,
                   help="chance of hiding each optional modality of a patch (default: a third of the base model's)")
    p.add_argument("--blend", type=_share,
                   help="share of the fine-tuned change kept in the new model: base + BLEND x (fine-tuned - base) "
                        "(default 0.5, so other cases keep what the base model did; 1 keeps the whole change)")
    p.set_defaults(run=_cmd_finetune)

    p = sub.add_parser("cases", help="list a dataset's cases: status in the store, volumes, model",
                       parents=[shared["model"], shared["device"]])
    p.add_argument("dataset", help="a BraTS root, a Decathlon task or a folder of case folders (nesting is fine)")
    p.add_argument("--store", help="corrections store (default: napari-unet-corrections beside each case, "
                                   "as the widget uses)")
    p.add_argument("--next", choices=["uncertainty", "order"],
                   help="also name the case to annotate next: the one --model is least sure of among those "
                        "not started (scored once per model, cached in the store), or the next in order")
    p.add_argument("--after", metavar="CASE", help="the case being annotated now (for --next)")
    p.set_defaults(run=_cmd_cases)

    p = sub.add_parser("report", help="one row per case: volumes in mL, review state, model, Dice against a reference")
    p.add_argument("paths", nargs="+", metavar="STORE_OR_FOLDER",
                   help="a corrections store (or any dataset root), or a folder of predictions from `predict`")
    p.add_argument("--reference", metavar="DIR",
                   help="reference segmentations matched by case id (a dataset root, a Decathlon task or a folder "
                        "of <case_id>.nii.gz): adds Dice WT/TC/ET")
    p.add_argument("--csv", metavar="FILE", help="also write the rows to this CSV file")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("annotate", help="open napari with the annotation widget and a case or a dataset",
                       parents=[shared["model"], shared["device"]])
    p.add_argument("case", nargs="?", help="case folder or file, or a dataset root (a BraTS root, a Decathlon task, "
                                           "a folder of case folders) to open as the widget's case list "
                                           "(default: the sample case)")
    p.set_defaults(run=_cmd_annotate)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from napari_unet.predict import Cancelled

    try:
        return args.run(args)
    except Cancelled:  # Ctrl-C, seen at the job's next step: nothing half written
        print(f"napari-unet {args.command}: cancelled", file=sys.stderr)
        return 130
    except NapariUnetError as err:
        print(f"napari-unet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-unet {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
