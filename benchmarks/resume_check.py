"""What a veil-shard resume pays to re-check finished shards: sha256 of each file, one thread vs a pool.

    python benchmarks/resume_check.py [--shards 400] [--mib 4] [--threads 2 4 8]

Writes ``--shards`` random files of ``--mib`` MiB in a temporary folder, reads them once (page cache
warm, as right after a killed run), then hashes them all with ``shards.file_sha256``: in one thread
(the resume before) and in a ``ThreadPoolExecutor`` of each ``--threads`` size (what
``shards.done_shards`` does, with min(8, CPUs) threads). Best of 3; writes
``benchmarks/results/resume_check_cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from veil_transforms.shards import file_sha256

OUT = Path(__file__).resolve().parent / "results" / "resume_check_cpu.md"


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=400)
    ap.add_argument("--mib", type=int, default=4, help="MiB per shard file")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="veil-resume-") as tmp:
        blob = os.urandom(args.mib << 20)
        files = []
        for i in range(args.shards):
            f = Path(tmp) / f"veil-{i:06d}.tar"
            f.write_bytes(blob[i:] + blob[:i])
            files.append(f)
        for f in files:
            f.read_bytes()
        gib = args.shards * args.mib / 1024
        rows = [("1 (before)", best_of(lambda: [file_sha256(f) for f in files]))]
        for k in args.threads:
            with ThreadPoolExecutor(k) as pool:
                rows.append((str(k), best_of(lambda: list(pool.map(file_sha256, files)))))
    cmd = "python benchmarks/resume_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = ["# Re-checking finished shards on resume: sha256, one thread vs a pool", "",
             f"Command: `{cmd.strip()}`", "",
             f"{args.shards} files of {args.mib} MiB ({gib:.2f} GiB), page cache warm; {os.cpu_count()} CPUs; best of 3.", "",
             "| threads | seconds | GiB/s | × one thread |", "|---|---|---|---|"]
    for k, t in rows:
        lines.append(f"| {k} | {t:.2f} | {gib / t:.2f} | {rows[0][1] / t:.2f} |")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
