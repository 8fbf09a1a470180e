"""Human-in-the-loop benchmark: does fine-tuning on a few corrected slices help on a new scanner?

Synthetic cases of a shifted appearance ("another scanner", `--shift`) play the new site.
A simulated annotator looks at the current model's proposals on the store cases, corrects
the K worst slices (lowest whole-tumour Dice, false alarms included) per round, and the
model is fine-tuned on everything corrected so far. After each round: Dice (WT, TC, ET) on
held-out cases of the same appearance, and the seconds the fine-tune took. For comparison,
a model of the same architecture trained from scratch on the same corrections.

    python benchmarks/bench_hitl.py --rounds 3 --slices 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_unet.cases import read_case
from napari_unet.metrics import dice, region_scores
from napari_unet.modelfile import default_model_path, load_model
from napari_unet.predict import Predictor
from napari_unet.session import AnnotationSession
from napari_unet.synth import write_dataset
from napari_unet.modelfile import make_metadata
from napari_unet.preprocess import Normalisation
from napari_unet.unet import UNet
from training.data import load_store
from training.loop import Settings, run


def held_out_dice(model_path, cases) -> dict[str, float]:
    predictor = Predictor(load_model(model_path), "cpu")
    scores = [region_scores(predictor.predict_case(c).labels, c.labels) for c in cases]
    return {r: float(np.mean([s[r]["dice"] for s in scores])) for r in ("WT", "TC", "ET")}


def worst_slices(sessions, cases, annotations, k: int) -> list[tuple[int, int]]:
    """(case index, slice) of the k unreviewed slices with the lowest whole-tumour Dice.

    Also refreshes `annotations` as the annotator sees them, through the session's own
    proposal merge: the new proposal on every slice not yet reviewed.
    """
    candidates = []
    for i, (session, case) in enumerate(zip(sessions, cases)):
        prediction, _ = session.predict(device="cpu")
        session.merge_proposal(annotations[i], prediction)
        pred = prediction.labels
        for z in np.flatnonzero((pred > 0).any(axis=(1, 2)) | (case.labels > 0).any(axis=(1, 2))):
            if z in session.reviewed:
                continue
            d = dice(pred[z] > 0, case.labels[z] > 0)
            errors = int(((pred[z] > 0) != (case.labels[z] > 0)).sum())
            candidates.append((d, -errors, i, int(z)))
    candidates.sort()
    return [(i, z) for _, _, i, z in candidates[:k]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=10, help="slices corrected per round")
    parser.add_argument("--store-cases", type=int, default=3)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--scratch-steps", type=int, default=300)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_hitl_"))
    try:
        pool = write_dataset(work / "pool", args.store_cases, seed=100, shift=args.shift)
        held = [read_case(p) for p in write_dataset(work / "held", args.held_out, seed=200, shift=args.shift)]
        store = work / "store"
        cases = [read_case(p) for p in pool]
        sessions = [AnnotationSession(c.source, c.images, store, model=args.model) for c in cases]
        annotations = [s.open_labels() for s in sessions]
        current = Path(args.model)
        rows = [{"round": 0, "slices": 0, "finetune_s": 0.0, "dice": held_out_dice(current, held), "scratch": None}]
        print(f"{'round':>5} {'slices':>6} {'fine-tune s':>11} {'WT':>7} {'TC':>7} {'ET':>7}   "
              f"{'scratch WT':>10} {'TC':>7} {'ET':>7}", flush=True)

        def show(row):
            d, s = row["dice"], row["scratch"]
            tail = f"   {s['WT']:>10.3f} {s['TC']:>7.3f} {s['ET']:>7.3f}" if s else ""
            print(f"{row['round']:>5} {row['slices']:>6} {row['finetune_s']:>11.1f} {d['WT']:>7.3f} {d['TC']:>7.3f} "
                  f"{d['ET']:>7.3f}{tail}", flush=True)

        show(rows[0])
        for r in range(1, args.rounds + 1):
            # The annotator corrects the worst slices: the truth goes into those slices.
            for i, z in worst_slices(sessions, cases, annotations, args.slices):
                annotations[i][z] = cases[i].labels[z]
            for session, labels in zip(sessions, annotations):
                session.collect_edits(labels)
                if session.reviewed:
                    session.save(session.snapshot(labels))
            start = time.perf_counter()
            reviewing = next(s for s in sessions if s.reviewed)
            out = reviewing.finetune(device="cpu").path  # the widget's fine-tune
            seconds = time.perf_counter() - start
            for session in sessions:
                session.set_model(out)
            scratch_path = work / f"scratch{r}.safetensors"
            # The same architecture from scratch on the same reviewed slices (and nothing else).
            base = load_model(args.model)
            config = base.model.config
            reviewed = load_store(store, base.modalities, Normalisation())
            run(UNet(config), make_metadata(config), reviewed, Settings(steps=args.scratch_steps, device="cpu"),
                out=scratch_path)
            current = out
            row = {"round": r, "slices": sum(len(s.reviewed) for s in sessions), "finetune_s": seconds,
                   "dice": held_out_dice(current, held), "scratch": held_out_dice(scratch_path, held)}
            rows.append(row)
            show(row)
        gain = rows[1]["dice"]["WT"] - rows[0]["dice"]["WT"]
        print(f"\nround 1: whole-tumour Dice {rows[0]['dice']['WT']:.3f} -> {rows[1]['dice']['WT']:.3f} "
              f"({gain:+.3f}) after {args.slices} corrected slices, fine-tune {rows[1]['finetune_s']:.1f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
