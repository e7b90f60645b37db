"""What recording shards in manifest.json costs over a long veil-shard run, with and without spacing.

    python benchmarks/manifest_records.py [--shards 3000] [--pace-ms 20]

The manifest is rewritten whole (read, merge, atomic write with fsync) per
record, so one record costs more the more shards it lists. This drives the
engine's own recorder (``shards.ManifestRecorder``) with shards finishing
every ``--pace-ms`` milliseconds (no veil, no images) and reports the records
made and the time they took, for spacing 0 (a record per shard, as before)
and the default spacing. Writes into a temporary folder
beside this script (a real disk, not tmpfs).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from veil_transforms import shards


def simulate(n: int, pace: float) -> shards.ManifestRecorder:
    """n shards recorded by the engine's recorder, one finishing every ``pace`` s."""
    out = Path(tempfile.mkdtemp(dir=Path(__file__).resolve().parent))
    try:
        shards.atomic_write_json(out / shards.MANIFEST, {  # a manifest as prepare() writes it
            "format": shards.FORMAT, "veil": {}, "key_fingerprint": "0" * 16, "num_shards": n, "shards": [],
            "source": {"listing_sha256": "0" * 64, "sample_shape": [1, 28, 28]}})
        rec = shards.ManifestRecorder(out)
        for i in range(n):
            time.sleep(pace)
            rec.add({"index": i, "name": shards.shard_name(i), "count": 1000, "sha256": "0" * 64,
                     "bytes": 2_500_000, "skipped": []})
        rec.flush()
        assert rec.manifest["complete"]
        return rec
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=3000)
    ap.add_argument("--pace-ms", type=float, default=20.0, help="one shard finishes every this many ms")
    args = ap.parse_args(argv)
    if args.shards < 1 or args.pace_ms <= 0:
        ap.error("--shards must be >= 1 and --pace-ms > 0")
    run_s = args.shards * args.pace_ms / 1000
    default = shards.MANIFEST_SPACING
    try:
        for spacing in (0, default):
            shards.MANIFEST_SPACING = spacing
            rec = simulate(args.shards, args.pace_ms / 1000)
            print(f"spacing {spacing:>3}: {rec.records:5d} records for {args.shards} shards, {rec.seconds:6.2f} s "
                  f"recording ({100 * rec.seconds / run_s:.1f}% of a {run_s:.0f} s run), last record {1000 * rec.cost:.1f} ms")
    finally:
        shards.MANIFEST_SPACING = default


if __name__ == "__main__":
    main()
