"""Click prompts with the standard simulated clicker: how many clicks make a proposal right?

    python benchmarks/bench_clicks.py [DIR] [--cases 6] [--seed 4242] [--shift 0] [--clicks 20]
                                      [--model M] [--precision auto|fp32|bf16]
                                      [--sigma-yx 8] [--sigma-z 4] [--margin 2]

DIR: any folder of cases with references (e.g. ../shared/real-dev, for evaluation only); default:
`--cases` synthetic held-out cases of randomised appearance and a seed no model was trained on,
made in a temporary folder that is removed.

The clicker of interactive segmentation papers (Xu et al. 2016, RITM, nnInteractive's
evaluation): each click goes to the voxel of the largest connected error region (3D) farthest
from that region's border; it is positive with the reference's label there, or negative where
the reference is background. With a whole-tumour reference (`*_wt.nii.gz`) only whole-tumour
errors count and a positive click says edema. Clicks go through `napari_unet.prompts`, as the
widget's do (nothing reviewed).

Per case: Dice WT/TC/ET after 0, 1, 3, 5 and 10 clicks, clicks to reach WT 0.90 (NoC@90, 20 when
never), seconds per click after a proposal (whose log-probabilities the clicks weigh, as in the
widget) and for a click before any proposal (the network run on the slices it reaches), and the
slices a simulated painter corrects worst-first to reach WT 0.90 and TC 0.85 (bench_stream.py's
annotator, without fine-tuning). The last line:
`clicks: N cases, NoC@90 WT 4.2, WT after 5 clicks 0.91 (proposal 0.78), 0.31 s per click`
followed by the painted slices for the same cases.
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
from bench_stream import without_loop  # noqa: E402

AFTER = (0, 1, 3, 5, 10)
NOC_TARGET = 0.90


def next_click(labels: np.ndarray, truth: np.ndarray, wt_only: bool):
    """The simulated click: (z, y, x) and the label it says, or None when nothing is wrong."""
    from scipy import ndimage

    from napari_unet.labels import EDEMA
    from napari_unet.prompts import Click

    wrong = (labels > 0) != (truth > 0) if wt_only else labels != truth
    pieces, n = ndimage.label(wrong)
    if n == 0:
        return None
    sizes = np.bincount(pieces.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    box = ndimage.find_objects(pieces)[largest - 1]
    inside = np.pad(pieces[box] == largest, 1)  # the border of the volume counts as a border
    depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1, 1:-1]
    local = np.unravel_index(int(np.argmax(depth)), depth.shape)
    point = tuple(int(s.start + c) for s, c in zip(box, local))
    label = int(truth[point])
    if wt_only and label:
        label = int(labels[point]) or EDEMA
    return Click(point, label)


def fill_between_seconds(truth: np.ndarray) -> float | None:
    """Fill between the whole tumour's shape on two slices 11 apart (a 10-slice gap) around the
    tumour's middle, as the Correct panel's button does; ITK loaded beforehand."""
    from napari_unet import edits
    from napari_unet.labels import EDEMA

    tumour = np.flatnonzero((truth > 0).any(axis=(1, 2)))
    if len(tumour) < 12:
        return None
    lo = int(tumour[len(tumour) // 2] - 5)
    labels = np.zeros_like(truth)
    for z in (lo, lo + 11):
        labels[z][truth[z] > 0] = EDEMA
    edits.fill_between(labels, lo, lo + 11, EDEMA)  # the first call loads ITK
    t0 = time.perf_counter()
    edits.fill_between(labels, lo, lo + 11, EDEMA)
    return time.perf_counter() - t0


def run_case(evidence, proposal: np.ndarray, truth: np.ndarray, regions, max_clicks: int, settings) -> dict:
    from napari_unet.prompts import apply_click

    wt_only = "TC" not in regions
    labels = proposal.copy()
    after = {0: scores(labels, truth, regions)}
    noc, seconds = None, []
    if after[0]["WT"] >= NOC_TARGET:
        noc = 0
    for k in range(1, max_clicks + 1):
        click = next_click(labels, truth, wt_only)
        if click is None:
            break
        t0 = time.perf_counter()
        labels = apply_click(labels, evidence, click, settings=settings).labels
        seconds.append(time.perf_counter() - t0)
        got = scores(labels, truth, regions)
        if k in AFTER:
            after[k] = got
        if noc is None and got["WT"] >= NOC_TARGET:
            noc = k
    for k in AFTER:  # no error left: the later counts are the last
        after.setdefault(k, scores(labels, truth, regions))
    return {"after": after, "noc": noc if noc is not None else max_clicks, "reached": noc is not None,
            "seconds": float(np.mean(seconds)) if seconds else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", help="cases with references (default: synthetic held-out cases)")
    parser.add_argument("--cases", type=int, help="cases (default: 6 synthetic, or all of DIR)")
    parser.add_argument("--seed", type=int, default=4242, help="the synthetic cases' seed (no model was trained on it)")
    parser.add_argument("--shift", type=float, default=0.0,
                        help="synthetic cases of another scanner (0 to 1; 1: where the shipped model needs most correcting)")
    parser.add_argument("--clicks", type=int, default=20, help="clicks per case at most (NoC@90's cap)")
    parser.add_argument("--model", help="the model (default: the shipped model)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 where the CPU has it), fp32 or bf16")
    parser.add_argument("--sigma-yx", type=float, help="a click's reach in-plane, voxels")
    parser.add_argument("--sigma-z", type=float, help="a click's reach across slices")
    parser.add_argument("--margin", type=float, help="how much a click outweighs the network, nats")
    parser.add_argument("--trust", type=float, help="how far a click overrules a network sure of the clicked voxel")
    parser.add_argument("--likeness", type=float, help="the contrasts' likeness scale, z-scores")
    args = parser.parse_args()

    from dataclasses import replace

    from napari_unet import NapariUnetError
    from napari_unet.cases import read_case
    from napari_unet.modelfile import default_model_path, load_model
    from napari_unet.predict import Predictor
    from napari_unet.prompts import DEFAULT_CLICK, ClickEvidence, apply_click
    from napari_unet.synth import write_dataset

    settings = replace(DEFAULT_CLICK, **{k: getattr(args, k) for k in ("sigma_yx", "sigma_z", "margin", "trust", "likeness")
                                         if getattr(args, k) is not None})
    work = Path(tempfile.mkdtemp(prefix="bench_clicks_"))
    try:
        def synthetic():
            n = args.cases or 6
            return (write_dataset(work / "cases", n, seed=args.seed, appearance="random", shift=args.shift),
                    f"{n} synthetic held-out cases, seed {args.seed}, randomised appearance, shift {args.shift}")

        found = cases_to_measure(args.dir, args.cases, synthetic)
        if found is None:
            return 0
        paths, where = found
        model = Path(args.model) if args.model else default_model_path()
        predictor = Predictor(load_model(model), "cpu", precision=args.precision)
        print(f"clicks on {where}; model {model.name}; {predictor.precision}; {settings}; CPU: {cpu_name()}",
              flush=True)
        rows = []
        for path in paths:
            case = read_case(path)
            truth, regions = reference(Path(path), case)
            if truth is None:
                print(f"  {case.case_id}: no reference; skipped")
                continue
            try:
                volume = predictor.prepare_case(case)
            except NapariUnetError as err:
                print(f"  {case.case_id}: {err}; skipped")
                continue
            prediction = predictor.predict(volume, with_log_probs=True)
            proposal = prediction.labels
            # A click before any proposal: the network runs on the slices the click reaches.
            first = next_click(proposal, truth, "TC" not in regions)
            cold = 0.0
            if first is not None:
                t0 = time.perf_counter()
                apply_click(proposal, ClickEvidence(predictor, volume), first, settings=settings)
                cold = time.perf_counter() - t0
            evidence = ClickEvidence(predictor, volume)  # as the widget has it after a proposal
            evidence.keep(prediction.computed_slices, prediction.log_probs)
            result = run_case(evidence, proposal, truth, regions, args.clicks, settings)
            result["cold_s"] = cold
            fill_s = fill_between_seconds(truth)
            painted, capped = without_loop(proposal, truth, regions, int((truth > 0).any(axis=(1, 2)).sum()))
            tumour = np.flatnonzero((truth > 0).any(axis=(1, 2)))
            rows.append({"case": case.case_id, "regions": regions, "painted": painted, "painted_capped": capped,
                         "fill_s": fill_s,
                         "span": int(tumour[-1] - tumour[0] + 1) if tumour.size else 0, **result})
            a = result["after"]
            print(f"  {case.case_id}: WT " + " ".join(f"{a[k]['WT']:.2f}" for k in AFTER)
                  + f"; NoC@90 {result['noc']}{'' if result['reached'] else '+'}; {result['seconds']:.2f} s per click "
                  f"(a click before any proposal {result['cold_s']:.2f} s); painted {painted}{'*' * capped}", flush=True)
        if not rows:
            print("clicks: no case could be measured")
            return 0
        head = (f"{'case':<24}{'span':>5}" + "".join(f"{'WT@' + str(k):>7}" for k in AFTER)
                + f"{'TC@0':>6}{'TC@5':>6}{'ET@0':>6}{'ET@5':>6}{'NoC@90':>8}{'s/click':>8}{'painted':>8}")
        print("\n" + head + "\n" + "-" * len(head))
        for r in rows:
            a = r["after"]
            cells = "".join(f"{a[k][reg]:>6.2f}" if reg in a[k] else f"{'-':>6}" for reg in ("TC", "ET") for k in (0, 5))
            print(f"{r['case']:<24}{r['span']:>5}" + "".join(f"{a[k]['WT']:>7.2f}" for k in AFTER) + cells
                  + f"{str(r['noc']) + ('' if r['reached'] else '+'):>8}{r['seconds']:>8.2f}"
                  + f"{str(r['painted']) + ('*' if r['painted_capped'] else ''):>8}")
        print("-" * len(head))
        mean = {k: float(np.mean([r["after"][k]["WT"] for r in rows])) for k in AFTER}
        sd5 = float(np.std([r["after"][5]["WT"] for r in rows]))
        noc = float(np.mean([r["noc"] for r in rows]))
        per_click = float(np.mean([r["seconds"] for r in rows]))
        cold = float(np.mean([r["cold_s"] for r in rows]))
        painted = float(np.mean([r["painted"] for r in rows]))
        print("mean WT after " + ", ".join(f"{k}: {mean[k]:.3f}" for k in AFTER) + f" (sd after 5: {sd5:.3f}); "
              "+ never reached WT 0.90 within the cap; painted: slices to WT 0.90 and TC 0.85 worst-first, "
              "* capped at the tumour's slices")
        fills = [r["fill_s"] for r in rows if r["fill_s"] is not None]
        if fills:
            print(f"fill between a 10-slice gap: {np.mean(fills):.3f} s on average, at most {max(fills):.3f} s "
                  "(target 0.3 s)")
        print(f"seconds per click after a proposal (its evidence kept) {per_click:.2f}, the first click before "
              f"any proposal (the network on the slices it reaches) {cold:.2f}; target 0.5 s")
        print(f"clicks: {len(rows)} cases, NoC@90 WT {noc:.1f}, WT after 5 clicks {mean[5]:.2f} "
              f"(proposal {mean[0]:.2f}), {per_click:.2f} s per click; slices painted instead {painted:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
