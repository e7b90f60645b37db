"""How much veil-demo's numbers move between runs: one fresh process per (mode, seed), as a user runs it.

    python benchmarks/demo_runs.py                       # paper and hardened, seeds 0 1 2 (~15 min, 2 CPUs)
    python benchmarks/demo_runs.py --modes hardened --seeds 0

Each run is ``veil-demo OUT --mode M --seed S`` (the CLI's defaults: 300 steps, 40 epochs, one torch
thread, a fresh key) in its own process; wall time includes the imports. Writes
``benchmarks/results/<out-name>.md`` and ``.json`` with every run and each mode's range.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CHILD = """
import json, sys
from veil_transforms.tools import demo
out, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
torch.set_num_threads(1)  # veil-demo's --threads default
res = demo.run_demo(out, mode=mode, seed=seed, verbose=False)
print("RESULT " + json.dumps(res))
"""
COLUMNS = (("baseline_acc", "baseline on X", 3), ("veiled_acc_on_X", "veiled model on X", 3),
           ("ssim_mean", "SSIM(X, X~)", 4), ("fold_ssim_mean", "fold-attack SSIM", 3),
           ("veil_seconds", "veil s", 1), ("wall_seconds", "whole run s", 1))


def run_one(mode: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "demo"), mode, str(seed)],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"veil-demo --mode {mode} --seed {seed} failed:\n{p.stderr[-2000:]}")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "seed": seed, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["paper", "hardened"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out-name", default="demo_runs")
    args = ap.parse_args(argv)

    import torch

    runs = []
    for mode in args.modes:
        for seed in args.seeds:
            r = run_one(mode, seed)
            runs.append(r)
            print(f"{mode} seed {seed}: " + ", ".join(f"{name} {r[k]:.{d}f}" for k, name, d in COLUMNS), flush=True)

    cmd = "python benchmarks/demo_runs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# veil-demo, run by run (torch {torch.__version__}, one torch thread per run)", "",
             f"Command: `{cmd.strip()}`", "",
             "| mode | seed | " + " | ".join(name for _, name, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {r['mode']} | {r['seed']} | " + " | ".join(f"{r[k]:.{d}f}" for k, _, d in COLUMNS) + " |"
              for r in runs]
    lines += ["", "Range per mode (min-max):", ""]
    for mode in args.modes:
        rs = [r for r in runs if r["mode"] == mode]
        lines.append(f"- {mode}: " + "; ".join(
            f"{name} {min(r[k] for r in rs):.{d}f}-{max(r[k] for r in rs):.{d}f}" for k, name, d in COLUMNS))
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out_name}.md").write_text(text)
    (RESULTS / f"{args.out_name}.json").write_text(json.dumps({"command": cmd, "runs": runs}, indent=1))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
