"""veil-shard's listing of a flat folder with a --labels CSV, per row (empty files: the listing never
opens them).

    python benchmarks/listing_csv.py [--rows 20000]

Prints the time and the listing hash (which a change to the listing must keep: resumes compare it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from veil_transforms import shards  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="listing-csv-"))
    try:
        root = work / "src"
        root.mkdir()
        with open(work / "labels.csv", "w") as f:
            f.write("filename,label\n")
            for i in range(args.rows):
                (root / f"img_{i:07d}.png").touch()
                f.write(f"img_{i:07d}.png,{i % 10}\n")
        t = time.perf_counter()
        src = shards.open_source(root, work / "labels.csv")
        dt = time.perf_counter() - t
        print(f"{args.rows} rows in {dt:.2f} s: {1e6 * dt / args.rows:.0f} us a row; "
              f"listing hash {src.listing_sha256()[:16]} (of the folder's own path too)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
