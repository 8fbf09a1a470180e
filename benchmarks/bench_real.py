"""Proposals on real glioma MRI, and the human-in-the-loop round on real data.

    python benchmarks/bench_real.py [DIR] [--model M] [--baseline M2] [--hitl-case ID]

DIR (default ../shared/real-dev) holds real cases, each a folder in a BraTS naming; their
reference is `*_seg.nii.gz` (any BraTS convention: WT, TC and ET are scored) or `*_wt.nii.gz`
(a whole-tumour mask: WT only). The real cases are for evaluation only: nothing here trains a
shipped model, and nothing is copied anywhere but a temporary folder that is removed.

1. Dice per case and region for the model and, side by side, a baseline (default: the shipped
   model), with the means over the cases each model could score. A case the model cannot work
   on (a modality it needs is missing) is listed with the reason.
2. The human-in-the-loop round: the 10 unreviewed slices with the lowest whole-tumour Dice of one
   real case are corrected with its reference through the annotation session, the model is
   fine-tuned as the widget does it, and Dice is measured again on that case's other slices and
   on the other real cases.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REGIONS = ("WT", "TC", "ET")


def reference(case_dir: Path, case) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """The case's reference labels (canonical) and the regions they allow scoring."""
    from napari_unet.cases import read_labels

    if case.labels is not None:
        return case.labels, REGIONS
    wt = sorted(case_dir.glob("*_wt.nii*"))
    if wt:
        labels, _ = read_labels(wt[0], "canonical")
        return (labels > 0).astype(np.uint8), ("WT",)
    return None, ()


def scores(labels: np.ndarray, truth: np.ndarray, regions) -> dict[str, float]:
    from napari_unet.metrics import dice
    from napari_unet.labels import region_mask

    return {r: dice(region_mask(labels, r), region_mask(truth, r)) for r in regions}


def evaluate(model, cases) -> dict[str, dict]:
    """case id -> {region: Dice} or {"error": message}."""
    from napari_unet import NapariUnetError
    from napari_unet.modelfile import load_model
    from napari_unet.predict import Predictor

    predictor = Predictor(load_model(model), "cpu")
    out = {}
    for case, truth, regions in cases:
        try:
            labels = predictor.predict_case(case).labels
        except NapariUnetError as err:
            message = str(err)
            out[case.case_id] = {"error": message[message.find("missing"):].split(" (")[0] if "missing" in message
                                 else message.split(": ", 1)[-1]}
            continue
        out[case.case_id] = scores(labels, truth, regions)
    return out


def means(result: dict) -> dict[str, float]:
    return {r: float(np.mean([s[r] for s in result.values() if r in s])) for r in REGIONS
            if any(r in s for s in result.values())}


def table(names: list[str], results: list[dict], cases) -> str:
    head = f"{'case':<24}{'modalities':<22}" + "".join(f"{n[:22]:>24}" for n in names)
    rows = [head, f"{'':<46}" + "".join(f"{'WT    TC    ET':>24}" for _ in names), "-" * len(head)]

    def cell(s):
        if "error" in s:
            return f"{s['error'][:22]:>24}"
        return f"{'  '.join(f'{s[r]:.2f}' if r in s else '  - ' for r in REGIONS):>24}"

    for case, _, _ in cases:
        rows.append(f"{case.case_id:<24}{','.join(case.images):<22}" + "".join(cell(r[case.case_id]) for r in results))
    rows.append("-" * len(head))
    rows.append(f"{'mean (cases scored)':<46}" + "".join(
        f"{'  '.join(f'{m[r]:.2f}' if r in m else '  - ' for r in REGIONS):>24}" for m in map(means, results)))
    return "\n".join(rows)


def hitl(model, cases, case_id: str | None, slices: int) -> None:
    from napari_unet import NapariUnetError
    from napari_unet.session import AnnotationSession

    usable = [(c, t, r) for c, t, r in cases if r == REGIONS and (case_id is None or c.case_id == case_id)]
    work = Path(tempfile.mkdtemp(prefix="bench_real_"))
    try:
        for case, truth, _ in usable:
            session = AnnotationSession(case.source, case.images, work / "store", model=model)
            try:
                prediction, _ = session.predict(device="cpu")
            except NapariUnetError as err:
                print(f"HITL: {case.case_id}: {err}")
                continue
            labels = session.open_labels()
            session.merge_proposal(labels, prediction)
            break
        else:
            print("HITL: no real case with full labels that the model can work on; skipped")
            return
        others = [(c, t, r) for c, t, r in cases if c is not case]
        before_others = evaluate(model, others)
        pred = prediction.labels
        candidates = np.flatnonzero((pred > 0).any(axis=(1, 2)) | (truth > 0).any(axis=(1, 2)))
        worst = sorted(candidates, key=lambda z: (scores(pred[z], truth[z], ("WT",))["WT"],
                                                  -int(((pred[z] > 0) != (truth[z] > 0)).sum())))[:slices]
        for z in worst:
            labels[z] = truth[z]
        session.collect_edits(labels)
        session.save(session.snapshot(labels))
        start = time.perf_counter()
        result = session.finetune(device="cpu")
        seconds = time.perf_counter() - start
        after, _ = session.predict(device="cpu")
        rest = np.setdiff1d(np.arange(len(truth)), worst)
        case_before = scores(pred[rest], truth[rest], REGIONS)
        case_after = scores(after.labels[rest], truth[rest], REGIONS)
        after_others = evaluate(result.path, others)
        print(f"\nHITL on {case.case_id}: {len(worst)} worst slices corrected, fine-tune {seconds:.1f} s "
              f"({result.steps} steps)")
        print("  that case, unreviewed slices: " + "  ".join(
            f"{r} {case_before[r]:.3f} -> {case_after[r]:.3f}" for r in REGIONS))
        print(table(["before", "after"], [before_others, after_others], others))
        b, a = means(before_others).get("WT"), means(after_others).get("WT")
        if b is not None:
            print(f"  other cases, mean WT {b:.3f} -> {a:.3f} ({a - b:+.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (", native bf16" if "avx512_bf16" in flags else "")
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "real-dev"))
    parser.add_argument("--model", help="model to measure (default: the shipped model)")
    parser.add_argument("--baseline", help="model beside it (default: the shipped model)")
    parser.add_argument("--hitl-case", help="case for the human-in-the-loop round (default: the first with full labels)")
    parser.add_argument("--slices", type=int, default=10, help="slices corrected in the HITL round (0: no round)")
    args = parser.parse_args()

    from napari_unet.cases import find_cases, read_case
    from napari_unet.modelfile import default_model_path

    root = Path(args.dir)
    if not root.is_dir():
        print(f"{root}: no real cases here; nothing to measure")
        return 0
    cases = []
    for path in find_cases(root):
        case = read_case(path)
        truth, regions = reference(Path(path), case)
        if truth is not None:
            cases.append((case, truth, regions))
    model = args.model or default_model_path()
    baseline = args.baseline or default_model_path()
    print(f"{len(cases)} real case(s) from {root}; CPU: {cpu_name()}")
    names = [f"model {Path(model).name}", f"baseline {Path(baseline).name}"]
    results = [evaluate(model, cases), evaluate(baseline, cases)]
    print(table(names, results, cases))
    if args.slices > 0:
        hitl(model, cases, args.hitl_case, args.slices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
