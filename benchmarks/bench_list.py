"""How long listing a dataset takes (the case list's target: 500 cases in under 2 s).

    python benchmarks/bench_list.py [DIR] [--store STORE] [--repeat 3]

With DIR, lists that dataset (any root the reader knows) against STORE (default: the store
beside each case). Without, it first makes --cases tiny synthetic case folders in a temporary
folder (--distinct cases from napari_unet.synth at --shape, copied under new names, since
listing never looks inside the files) and a store in which a third of them are in progress and
a sixth done, so that listing reads corrections.json files too. Prints the first run and the
median of --repeat runs; the final line is `list: N cases in S s` (the median).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from napari_unet.dataset import DONE, IN_PROGRESS, NOT_STARTED, UNREADABLE, list_dataset


def make_dataset(root: Path, store: Path, cases: int, distinct: int, shape) -> None:
    from napari_unet import store as store_format
    from napari_unet.cases import case_ids, read_case
    from napari_unet.synth import write_dataset

    made = write_dataset(root / "made", min(distinct, cases), seed=0, shape=shape)
    for i, case_id in enumerate(case_ids("brats2021", cases)):
        src = made[i % len(made)]
        (root / case_id).mkdir()
        for f in src.iterdir():
            shutil.copyfile(f, root / case_id / f.name.replace(src.name, case_id))
        if i % 3 == 0:  # a third started, half of those done
            case = read_case(root / case_id)
            corrections = store_format.Corrections({0, 1}, {1}, store_format.SHIPPED_MODEL_NAME, done=i % 6 == 0)
            store_format.write(store, case.source, case.labels, corrections, case.images)
    shutil.rmtree(root / "made")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="a dataset to list (default: synthetic cases in a temporary folder)")
    parser.add_argument("--store", help="corrections store (default: the one beside each case; for the "
                                        "synthetic dataset, one made beside it)")
    parser.add_argument("--cases", type=int, default=500, help="synthetic cases (default 500)")
    parser.add_argument("--distinct", type=int, default=10, help="distinct synthetic cases among them (default 10)")
    parser.add_argument("--shape", type=int, nargs=3, default=(8, 8, 8), metavar=("X", "Y", "Z"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_list-") as tmp:
        if args.dir:
            root, store = Path(args.dir), args.store
        else:
            root, store = Path(tmp) / "data", Path(args.store or Path(tmp) / "store")
            root.mkdir()
            start = time.perf_counter()
            make_dataset(root, store, args.cases, args.distinct, tuple(args.shape))
            print(f"made {args.cases} cases of {'x'.join(map(str, args.shape))} voxels in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        times = []
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            entries = list_dataset(root, store)
            times.append(time.perf_counter() - start)
    counts = ", ".join(f"{sum(e.status == s for e in entries)} {s}" for s in (DONE, IN_PROGRESS, NOT_STARTED, UNREADABLE))
    print(f"statuses: {counts}")
    print(f"first run {times[0]:.3f} s; median of {len(times)}: {statistics.median(times):.3f} s")
    print(f"list: {len(entries)} cases in {statistics.median(times):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
