"""A stream of cases from one site: how many slices does an annotator correct, with and without the loop?

    python benchmarks/bench_stream.py [DIR] [--cases 6] [--every 5] [--max-slices 40]
                                      [--shift 1] [--shape X Y Z] [--seed 300] [--model M]

A simulated annotator works through the cases of DIR in order (default: `--cases` synthetic
cases of one shifted site, `--shift 1`, the standard look moved to "another scanner", made in a
temporary folder that is removed; real cases by argument, e.g. ../shared/real-dev, for evaluation
only). Within a case it corrects the worst slice first (the unreviewed axial slice with the most
wrong voxels is set to the reference) until the case's whole volume, corrected slices included,
reaches WT Dice >= 0.90 and TC >= 0.85 (WT only where the reference is a whole-tumour mask,
`*_wt.nii.gz`; such a slice keeps the proposal's classes inside the reference, edema where the
proposal had none).

- Without the loop: the base model's proposal, corrected worst slice first, no fine-tune; capped
  at the case's tumour slices (a full manual annotation), marked `*` when capped.
- With the loop: the corrections go through the annotation session and its store as the widget
  does it, every `--every` corrected slices (counted over the whole stream) the current model is
  fine-tuned on the store (the earlier cases' corrected slices and this case's), and the
  unreviewed slices are proposed again by the new model; the model carries to the next case.
  Capped at `--max-slices` a case (marked `+`: at least that many).

Per case: tumour slices, Dice of the first proposal (base model; the carried model), slices
corrected without and with the loop, fine-tunes and their seconds. The last line:
`stream: N cases, 61 slices corrected with the loop, 190 without (ratio 0.32), fine-tune 95 s`
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import cases_to_measure, cpu_name, reference, scores  # noqa: E402

TARGETS = {"WT": 0.90, "TC": 0.85}


def met(labels: np.ndarray, truth: np.ndarray, regions) -> tuple[bool, dict[str, float]]:
    """Whether the labels reach the targets on the regions the reference allows, and the Dice."""
    got = scores(labels, truth, [r for r in TARGETS if r in regions])
    return all(v >= TARGETS[r] for r, v in got.items()), got


def wrong_voxels(labels: np.ndarray, truth: np.ndarray, wt_only: bool) -> np.ndarray:
    """Per axial slice, the voxels whose label differs from the reference (tumour or not, if WT only)."""
    diff = (labels > 0) != (truth > 0) if wt_only else labels != truth
    return diff.reshape(len(diff), -1).sum(axis=1)


def corrected(proposal: np.ndarray, truth: np.ndarray, wt_only: bool) -> np.ndarray:
    """A slice set to the reference; with a whole-tumour reference, the proposal's classes inside it
    (edema where the proposal had no tumour)."""
    if not wt_only:
        return truth.copy()
    from napari_unet.labels import EDEMA

    return np.where(truth > 0, np.where(proposal > 0, proposal, EDEMA), 0).astype(np.uint8)


def without_loop(proposal: np.ndarray, truth: np.ndarray, regions, cap: int) -> tuple[int, bool]:
    """Slices corrected worst first on a fixed proposal until the targets are met; (count, capped)."""
    wt_only = "TC" not in regions
    # Dice only sees slices with tumour in the proposal or the reference; corrections stay there.
    keep = np.flatnonzero((proposal > 0).any(axis=(1, 2)) | (truth > 0).any(axis=(1, 2)))
    labels, ref = proposal[keep].copy(), truth[keep]
    wrong = wrong_voxels(labels, ref, wt_only)
    order = np.argsort(-wrong, kind="stable")
    n = 0
    while not met(labels, ref, regions)[0]:
        if n >= min(cap, len(order)) or wrong[order[n]] == 0:
            return n, True
        z = order[n]
        labels[z] = corrected(labels[z], ref[z], wt_only)
        n += 1
    return n, False


class Stream:
    """The annotator with the loop: one store and one model, carried from case to case."""

    def __init__(self, model: Path, store: Path, every: int, device: str):
        self.model, self.store, self.every, self.device = model, store, every, device
        self.pending = 0  # slices corrected since the last fine-tune

    def case(self, case, truth, regions, cap: int) -> dict:
        from napari_unet.session import AnnotationSession

        wt_only = "TC" not in regions
        session = AnnotationSession(case.source, case.images, self.store, model=self.model)
        labels = session.open_labels()
        prediction, _ = session.predict(device=self.device)
        session.merge_proposal(labels, prediction)
        start = met(labels, truth, regions)[1]
        n, seconds, finetunes = 0, 0.0, 0
        done, got = met(labels, truth, regions)
        while not done and n < cap:
            wrong = wrong_voxels(labels, truth, wt_only)
            wrong[sorted(session.reviewed)] = -1
            z = int(np.argmax(wrong))
            if wrong[z] <= 0:
                break
            labels[z] = corrected(labels[z], truth[z], wt_only)  # the annotator's correction
            session.collect_edits(labels)
            n += 1
            self.pending += 1
            if self.pending >= self.every:
                session.save(session.snapshot(labels))
                t0 = time.perf_counter()
                result = session.finetune(device=self.device)  # the widget's fine-tune
                seconds += time.perf_counter() - t0
                finetunes += 1
                self.pending = 0
                self.model = result.path
                prediction, _ = session.predict(device=self.device)
                session.merge_proposal(labels, prediction)  # unreviewed slices only
                print(f"    {case.case_id}: fine-tune after {n} slices, {time.perf_counter() - t0:.1f} s "
                      f"({result.steps} steps)", flush=True)
            done, got = met(labels, truth, regions)
        if session.reviewed:
            session.save(session.snapshot(labels))  # into the store for the next fine-tunes
        return {"slices": n, "capped": not done, "start": start, "end": got, "finetunes": finetunes,
                "seconds": seconds}


def synthetic_site(out: Path, cases: int, seed: int, shift: float, shape) -> list[Path]:
    from napari_unet.synth import BRATS_SHAPE, write_dataset

    return write_dataset(out, cases, seed=seed, shift=shift, shape=tuple(shape or BRATS_SHAPE))


def dice_cell(d: dict[str, float]) -> str:
    return f"{d['WT']:.2f} " + (f"{d['TC']:.2f}" if "TC" in d else "  - ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", help="cases to stream (default: synthetic cases of one shifted site)")
    parser.add_argument("--cases", type=int, help="cases to stream (default: 6 synthetic, or all of DIR)")
    parser.add_argument("--every", type=int, default=5, help="fine-tune every K corrected slices")
    parser.add_argument("--max-slices", type=int, default=40, help="corrections per case with the loop, at most")
    parser.add_argument("--shift", type=float, default=1.0, help="the synthetic site's scanner shift (0 to 1)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="synthetic grid (default BraTS)")
    parser.add_argument("--seed", type=int, default=300, help="the synthetic site's seed (training uses others)")
    parser.add_argument("--model", help="base model (default: the shipped model)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from napari_unet import NapariUnetError
    from napari_unet.cases import read_case
    from napari_unet.modelfile import default_model_path, load_model
    from napari_unet.predict import Predictor

    wall = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    try:
        def synthetic():
            n = args.cases or 6
            return (synthetic_site(work / "site", n, args.seed, args.shift, args.shape),
                    f"{n} synthetic cases, shift {args.shift}, seed {args.seed}, "
                    f"shape {tuple(args.shape) if args.shape else 'BraTS 240 240 155'}")

        found = cases_to_measure(args.dir, args.cases, synthetic)
        if found is None:
            return 0
        paths, where = found
        model = Path(args.model) if args.model else default_model_path()
        base = Predictor(load_model(model), args.device)
        stream = Stream(model, work / "store", args.every, args.device)
        print(f"stream of {where}; model {model.name}; fine-tune every {args.every} slices; "
              f"targets WT >= {TARGETS['WT']}, TC >= {TARGETS['TC']}; CPU: {cpu_name()}", flush=True)
        rows = []
        for path in paths:
            case = read_case(path)
            truth, regions = reference(Path(path), case)
            if truth is None:
                print(f"  {case.case_id}: no reference; skipped")
                continue
            try:
                proposal = base.predict_case(case).labels
            except NapariUnetError as err:
                print(f"  {case.case_id}: {err}; skipped")
                continue
            tumour = int((truth > 0).any(axis=(1, 2)).sum())
            n0, capped0 = without_loop(proposal, truth, regions, tumour)
            loop = stream.case(case, truth, regions, min(args.max_slices, tumour))
            row = {"case": case.case_id, "tumour": tumour, "base": met(proposal, truth, regions)[1],
                   "without": n0, "without_capped": capped0, **loop}
            rows.append(row)
            print(f"  {case.case_id}: {tumour} tumour slices; without the loop {n0}{'*' * capped0}, "
                  f"with {loop['slices']}{'+' * loop['capped']} ({loop['finetunes']} fine-tunes, "
                  f"{loop['seconds']:.1f} s)", flush=True)
        if not rows:
            print("stream: no case could be measured")
            return 0
        head = (f"{'case':<24}{'tumour':>7}{'base WT  TC':>13}{'no loop':>9}{'loop start':>12}"
                f"{'loop':>6}{'end WT  TC':>12}{'fine-tunes':>11}{'seconds':>9}")
        print("\n" + head + "\n" + "-" * len(head))
        for r in rows:
            print(f"{r['case']:<24}{r['tumour']:>7}{dice_cell(r['base']):>13}"
                  f"{str(r['without']) + ('*' if r['without_capped'] else ' '):>9}{dice_cell(r['start']):>12}"
                  f"{str(r['slices']) + ('+' if r['capped'] else ' '):>6}{dice_cell(r['end']):>12}"
                  f"{r['finetunes']:>11}{r['seconds']:>9.1f}")
        with_loop = sum(r["slices"] for r in rows)
        without = sum(r["without"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        ratio = with_loop / without if without else float("nan")
        print("-" * len(head))
        print("* no loop: capped at the case's tumour slices; + loop: capped at --max-slices or the tumour "
              "slices (at least that many)")
        bound = " (the loop hit its cap: a lower bound)" if any(r["capped"] for r in rows) else ""
        print(f"targets: loop <= half of no loop: {'met' if ratio <= 0.5 else 'missed'} (ratio {ratio:.2f}{bound}); "
              f"last case fewer than the first: "
              f"{'met' if rows[-1]['slices'] < rows[0]['slices'] else 'missed'} "
              f"({rows[0]['slices']} -> {rows[-1]['slices']}); wall {time.perf_counter() - wall:.0f} s")
        print(f"stream: {len(rows)} cases, {with_loop} slices corrected with the loop, {without} without "
              f"(ratio {ratio:.2f}), fine-tune {seconds:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
