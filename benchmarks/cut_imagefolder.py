"""Cut a small ImageFolder tree (``train/<class>/*``, ``test/<class>/*``) out of a larger
``.tar``/``.tar.xz`` image archive of the same layout, copying the image files as they are
(no re-encoding): a stand-in for a user's own small data set.

Example (the issue-23 measurement, docs/results.md "A small ImageFolder data set")::

    python benchmarks/cut_imagefolder.py ../shared/data/cifar10-jpeg75.tar.xz runs/small300 \\
        --train-per-class 300 --test-per-class 1000
    python sim.py --preset quick --data runs/small300 --devices 2,5 --out runs/small
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from collections import Counter
from pathlib import Path


def cut(archive: Path, out: Path, per_class: dict[str, int]) -> Counter:
    """The first ``per_class[split]`` files of each class of each split, in archive order."""
    if out.exists():
        raise SystemExit(f"cut_imagefolder.py: error: {out} exists; choose another folder")
    tmp = out.with_name(out.name + ".partial")
    taken: Counter = Counter()
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] not in per_class:
                continue
            split, cls = parts[-3], parts[-2]
            if taken[split, cls] >= per_class[split]:
                continue
            dest = tmp / split / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())
            taken[split, cls] += 1
    tmp.rename(out)  # the tree appears whole or not at all
    return taken


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=1000)
    a = ap.parse_args(argv)
    if not a.archive.is_file():
        ap.exit(2, f"cut_imagefolder.py: error: no archive at {a.archive}\n")
    try:
        taken = cut(a.archive, a.out, {"train": a.train_per_class, "test": a.test_per_class})
    except tarfile.TarError as e:
        ap.exit(2, f"cut_imagefolder.py: error: cannot read {a.archive}: {str(e).splitlines()[0]}\n")
    for split in ("train", "test"):
        counts = [n for (s, _), n in sorted(taken.items()) if s == split]
        print(f"{split}: {len(counts)} classes, {sum(counts)} images ({min(counts, default=0)}-"
              f"{max(counts, default=0)} per class)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
