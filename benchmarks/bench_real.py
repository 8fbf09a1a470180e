"""Proposals on real glioma MRI, and the human-in-the-loop rounds on real data.

    python benchmarks/bench_real.py [DIR] [--model M] [--baseline M2] [--hitl all|none|CASE]
                                    [--slices 10] [--site A,B:C]

DIR (default ../shared/real-dev) holds real cases, each a folder in a BraTS naming; their
reference is `*_seg.nii.gz` (any BraTS convention: WT, TC and ET are scored) or `*_wt.nii.gz`
(a whole-tumour mask: WT only). The real cases are for evaluation only: nothing here trains a
shipped model, and nothing is copied anywhere but a temporary folder that is removed.

1. Dice per case and region for the model and, side by side, a baseline (default: the shipped
   model), with the mean, the case-to-case spread (standard deviation) and the worst case over the
   cases each model could score. A case the model cannot work on is listed with the reason.
   Under it, per case, the tumour each model proposes more than 20 mm from any reference tumour
   (mL, and how much of it is necrotic core): false alarms on healthy tissue, which Dice mixes
   with border disagreements.
2. The human-in-the-loop rounds (`--hitl all`, the default: every case with full labels in turn;
   or one case by id): the `--slices` unreviewed slices with the lowest whole-tumour Dice of the
   case are corrected with its reference through the annotation session, the model is fine-tuned
   as the widget does it, and Dice is measured again on that case's other slices and on every
   other case. A class is "lost" on a case when the model predicted at least 100 voxels of it
   before the fine-tune and fewer than a tenth of that after.
3. `--site A,B:C`: fine-tune on cases A and B whole (a store with no corrections.json, as after
   two fully annotated cases of one site), then Dice on C (the site's next case) and on the
   cases of other sites (every case not named).

The last line sums it up:
`real: N cases, WT 0.79 +- 0.13, TC 0.63 +- 0.12, ET 0.69 +- 0.12; HITL 4 rounds: corrected WT +0.04
(worst +0.01), others WT +0.03 (worst round -0.01), classes lost 0`
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
# Tumour proposed this far from any reference tumour is a false alarm on healthy tissue, not a
# border disagreement (a model that takes grey matter for necrotic core shows here first).
FAR_MM = 20.0


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


def cases_to_measure(directory: str | None, cases: int | None, synthetic) -> tuple[list, str] | None:
    """The benchmarks' cases: DIR's (any folder of cases, e.g. real ones for evaluation), at most
    `cases`; without DIR, `synthetic()` -> (paths, their description). None, said, when DIR
    holds nothing."""
    from napari_unet.cases import find_cases

    if not directory:
        return synthetic()
    root = Path(directory)
    if not root.is_dir():
        print(f"{root}: no cases here; nothing to measure")
        return None
    return find_cases(root)[:cases], str(root)


def scores(labels: np.ndarray, truth: np.ndarray, regions) -> dict[str, float]:
    from napari_unet.metrics import dice
    from napari_unet.labels import region_mask

    return {r: dice(region_mask(labels, r), region_mask(truth, r)) for r in regions}


def evaluate(model, cases) -> dict[str, dict]:
    """case id -> {region: Dice, "voxels": per class} or {"error": message}."""
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
        out[case.case_id] = {**scores(labels, truth, regions),
                             "voxels": np.bincount(labels.ravel(), minlength=4)[1:4].tolist(),
                             "far_ml": far_from_reference_ml(labels, truth, case.spacing)}
    return out


def far_from_reference_ml(labels: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    """(tumour, of it necrotic core) proposed more than FAR_MM from any reference tumour, in mL."""
    from scipy import ndimage

    from napari_unet.labels import NECROTIC

    far = (labels > 0) & (ndimage.distance_transform_edt(truth == 0, sampling=spacing) > FAR_MM)
    voxel_ml = float(np.prod(spacing)) / 1000
    return float(far.sum() * voxel_ml), float((far & (labels == NECROTIC)).sum() * voxel_ml)


def far_table(names: list[str], results: list[dict], cases) -> str:
    rows = [f"tumour proposed more than {FAR_MM:.0f} mm from the reference tumour, mL (of it necrotic core)",
            f"{'case':<24}" + "".join(f"{n[:22]:>24}" for n in names)]

    def cell(s):
        return f"{'-':>24}" if "far_ml" not in s else f"{s['far_ml'][0]:>15.1f} ({s['far_ml'][1]:.1f})".rjust(24)

    for case, _, _ in cases:
        rows.append(f"{case.case_id:<24}" + "".join(cell(r[case.case_id]) for r in results))
    mean = [np.mean([s["far_ml"] for s in r.values() if "far_ml" in s] or [(np.nan, np.nan)], axis=0) for r in results]
    rows.append(f"{'mean':<24}" + "".join(f"{m[0]:>15.1f} ({m[1]:.1f})".rjust(24) for m in mean))
    return "\n".join(rows)


def means(result: dict) -> dict[str, float]:
    return {r: float(np.mean([s[r] for s in result.values() if r in s])) for r in REGIONS
            if any(r in s for s in result.values())}


def spread(result: dict) -> dict[str, tuple[float, float, float]]:
    """region -> (mean, standard deviation, worst) over the cases scored."""
    out = {}
    for r in REGIONS:
        values = [s[r] for s in result.values() if r in s]
        if values:
            out[r] = (float(np.mean(values)), float(np.std(values)), float(np.min(values)))
    return out


def table(names: list[str], results: list[dict], cases) -> str:
    head = f"{'case':<24}{'modalities':<22}" + "".join(f"{n[:22]:>24}" for n in names)
    rows = [head, f"{'':<46}" + "".join(f"{'WT    TC    ET':>24}" for _ in names), "-" * len(head)]

    def cell(s):
        if "error" in s:
            return f"{s['error'][:22]:>24}"
        return f"{'  '.join(f'{s[r]:.2f}' if r in s else '  - ' for r in REGIONS):>24}"

    def stat(result, k):
        sp = spread(result)
        return f"{'  '.join(f'{sp[r][k]:.2f}' if r in sp else '  - ' for r in REGIONS):>24}"

    for case, _, _ in cases:
        rows.append(f"{case.case_id:<24}{','.join(case.images):<22}" + "".join(cell(r[case.case_id]) for r in results))
    rows.append("-" * len(head))
    for label, k in (("mean (cases scored)", 0), ("spread (sd)", 1), ("worst case", 2)):
        rows.append(f"{label:<46}" + "".join(stat(r, k) for r in results))
    return "\n".join(rows)


def lost_classes(before: dict, after: dict) -> list[str]:
    """'case: class' for each class predicted before (>= 100 voxels) and all but gone after."""
    names = ("necrotic core", "edema", "enhancing")
    lost = []
    for case_id, b in before.items():
        a = after.get(case_id, {})
        if "voxels" not in b or "voxels" not in a:
            continue
        for k, name in enumerate(names):
            if b["voxels"][k] >= 100 and a["voxels"][k] < b["voxels"][k] / 10:
                lost.append(f"{case_id}: {name} {b['voxels'][k]} -> {a['voxels'][k]} voxels")
    return lost


def hitl_round(model, cases, case, truth, slices: int, before_all: dict, work: Path) -> dict | None:
    """One round: `slices` worst slices of `case` corrected, fine-tune, Dice again everywhere."""
    from napari_unet import NapariUnetError
    from napari_unet.session import AnnotationSession

    session = AnnotationSession(case.source, case.images, work / f"store_{case.case_id}", model=model)
    try:
        prediction, _ = session.predict(device="cpu")
    except NapariUnetError as err:
        print(f"HITL: {case.case_id}: {err}")
        return None
    labels = session.open_labels()
    session.merge_proposal(labels, prediction)
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
    others = [(c, t, r) for c, t, r in cases if c is not case]
    before_others = {c.case_id: before_all[c.case_id] for c, _, _ in others}
    after_others = evaluate(result.path, others)
    round_ = {
        "case": case.case_id, "seconds": seconds, "steps": result.steps,
        "case_before": scores(pred[rest], truth[rest], REGIONS),
        "case_after": scores(after.labels[rest], truth[rest], REGIONS),
        "others_before": means(before_others).get("WT"), "others_after": means(after_others).get("WT"),
        "lost": lost_classes(before_others, after_others),
    }
    print(f"\nHITL on {case.case_id}: {len(worst)} worst slices corrected, fine-tune {seconds:.1f} s "
          f"({result.steps} steps)")
    print("  that case, unreviewed slices: " + "  ".join(
        f"{r} {round_['case_before'][r]:.3f} -> {round_['case_after'][r]:.3f}" for r in REGIONS))
    print(table(["before", "after"], [before_others, after_others], others))
    b, a = round_["others_before"], round_["others_after"]
    print(f"  other cases, mean WT {b:.3f} -> {a:.3f} ({a - b:+.3f}); classes lost: "
          + ("; ".join(round_["lost"]) or "none"), flush=True)
    return round_


def hitl_summary(rounds: list[dict]) -> str:
    if not rounds:
        return "no HITL round"
    own = [r["case_after"]["WT"] - r["case_before"]["WT"] for r in rounds]
    others = [r["others_after"] - r["others_before"] for r in rounds]
    print(f"\n{'HITL round':<24}{'corrected WT':>14}{'TC':>8}{'ET':>8}{'others WT':>12}{'lost':>6}")
    for r, o, d in zip(rounds, own, others):
        tc = r["case_after"]["TC"] - r["case_before"]["TC"]
        et = r["case_after"]["ET"] - r["case_before"]["ET"]
        print(f"{r['case']:<24}{o:>+14.3f}{tc:>+8.3f}{et:>+8.3f}{d:>+12.3f}{len(r['lost']):>6}")
    print(f"{'mean':<24}{np.mean(own):>+14.3f}{'':>16}{np.mean(others):>+12.3f}")
    print(f"{'worst':<24}{np.min(own):>+14.3f}{'':>16}{np.min(others):>+12.3f}")
    return (f"HITL {len(rounds)} rounds: corrected WT {np.mean(own):+.3f} (worst {np.min(own):+.3f}), "
            f"others WT {np.mean(others):+.3f} (worst round {np.min(others):+.3f}), "
            f"classes lost {sum(len(r['lost']) for r in rounds)}")


def site_finetune(model, cases, spec: str, before_all: dict, work: Path) -> str:
    """Fine-tune on whole cases of one site; Dice of the site's next case and of the other sites."""
    from training.loop import FINETUNE, finetune

    taught_ids, _, next_ids = spec.partition(":")
    taught_ids, next_ids = taught_ids.split(","), [i for i in next_ids.split(",") if i]
    by_id = {c.case_id: (c, t, r) for c, t, r in cases}
    missing = [i for i in taught_ids + next_ids if i not in by_id]
    if missing:
        return f"site: no case {', '.join(missing)} here; skipped"
    store = work / "site_store"
    for i in taught_ids:  # whole cases: their own files, no corrections.json
        src = Path(by_id[i][0].source.path)
        shutil.copytree(src if src.is_dir() else src.parent, store / src.name)
    start = time.perf_counter()
    result = finetune(store, model, work / "site.safetensors", settings=FINETUNE.updated(device="cpu"))
    seconds = time.perf_counter() - start
    measured = [by_id[i] for i in by_id if i not in taught_ids]
    after = evaluate(result.path, measured)
    before = {c.case_id: before_all[c.case_id] for c, _, _ in measured}
    print(f"\nSite fine-tune on {', '.join(taught_ids)} (whole cases), {seconds:.1f} s, {result.steps} steps")
    print(table(["before", "after"], [before, after], measured))

    def mean_dice(result, ids):
        per_case = [np.mean([result[i][r] for r in REGIONS if r in result[i]]) for i in ids if "error" not in result[i]]
        return float(np.mean(per_case)) if per_case else float("nan")

    nxt = next_ids
    other = [c.case_id for c, _, _ in measured if c.case_id not in next_ids]
    line = (f"site: next case mean Dice {mean_dice(before, nxt):.3f} -> {mean_dice(after, nxt):.3f} "
            f"({mean_dice(after, nxt) - mean_dice(before, nxt):+.3f}), other sites "
            f"{mean_dice(before, other):.3f} -> {mean_dice(after, other):.3f} "
            f"({mean_dice(after, other) - mean_dice(before, other):+.3f}); classes lost "
            f"{len(lost_classes(before, after))}")
    print(line)
    return line


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
    parser.add_argument("--hitl", default="all", help="all (every case with full labels in turn), none, or a case id")
    parser.add_argument("--slices", type=int, default=10, help="slices corrected in a HITL round")
    parser.add_argument("--site", help="A,B:C: fine-tune on whole cases A and B, measure C and the others")
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
    print(f"{len(cases)} real case(s) from {root}; CPU: {cpu_name()}", flush=True)
    names = [f"model {Path(model).name}", f"baseline {Path(baseline).name}"]
    results = [evaluate(model, cases), evaluate(baseline, cases)]
    print(table(names, results, cases), flush=True)
    print("\n" + far_table(names, results, cases), flush=True)
    sp = spread(results[0])
    summary = f"real: {len(cases)} cases, " + ", ".join(f"{r} {m:.2f} +- {d:.2f}" for r, (m, d, _) in sp.items())
    work = Path(tempfile.mkdtemp(prefix="bench_real_"))
    try:
        if args.site:
            summary += "; " + site_finetune(model, cases, args.site, results[0], work)
        rounds = []
        if args.hitl != "none":
            chosen = [(c, t) for c, t, r in cases if r == REGIONS and args.hitl in ("all", c.case_id)]
            for case, truth in chosen:
                round_ = hitl_round(model, cases, case, truth, args.slices, results[0], work)
                if round_:
                    rounds.append(round_)
            summary += "; " + hitl_summary(rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
