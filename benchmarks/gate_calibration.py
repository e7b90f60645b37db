"""Calibrating veil-export's attack bar: absolute SSIM against SSIM beyond a flat image.

    python benchmarks/gate_calibration.py [--sizes 25 64 128] [--n 80] [--out-name gate_calibration]

The gate refused a sample whose strongest key-free attack scored SSIM > 0.3 against its original.
That bar was set on 25x25 LFW and 28x28 MNIST. On larger or smoother images a flat image scores
far above it (SSIM's 7x7 windows of a smooth image are matched by brightness alone), and so does
an attack's denoised noise, for the same reason: hardened veils that carry nothing were refused.

For each image size (LFW crops, upscaled by load_lfw_faces) this trains F (LeNet-5, 30 epochs on 140
crops, half faces), veils ``--n`` of them with the paper's veil (300 steps) and the hardened one (75
steps, one copy), runs the gate's attacks (audit.run, cheap attacks) and reports per setting:

- ``attack``: each sample's strongest attack SSIM (what the gate scores);
- ``flat``: audit.flat_ssim, the best flat image (black, grey, white, its own mean level) against
  any of the same references;
- ``gain``: AuditReport.per_sample_gain, per reference the share of what the best flat image leaves
  unexplained that the attacks recover, (best - flat) / (1 - flat), the largest over the references
  (what veil-export's --max-attack-gain bounds);
- ``null``: the same attacks on *another* image's veil (a veil that says nothing about this image),
  and its gain: how high "nothing" scores;
- how many samples each rule refuses: the absolute bar alone (attack > 0.3), and the bar with a
  gain bar (attack > 0.3 and gain > g) for several g.

Writes benchmarks/results/<out-name>.md and .json. CPU, one thread: about 4 min for 25 and 64 px,
plus about 6 min for 128 px (2-core VM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from veil_transforms import audit
from veil_transforms import functional as VF
from veil_transforms.data import load_lfw_faces
from veil_transforms.nets import LeNet5
from veil_transforms.training import fit

RESULTS = Path(__file__).resolve().parent / "results"
BAR = 0.3
GAINS = (0.0, 0.05, 0.1, 0.15, 0.2)
SETTINGS = (("paper", 300), ("hardened", 75))


def split(size: int, n: int):
    """F's training set (70 faces, 70 others, fixed draw) and the first ``n`` of it (half faces), veiled."""
    x, y = load_lfw_faces(size)
    g = torch.Generator().manual_seed(10_000)
    parts = [torch.nonzero(y == c).flatten() for c in (1, 0)]
    parts = [p[torch.randperm(len(p), generator=g)][:70] for p in parts]
    victims = torch.cat([parts[0][: n // 2], parts[1][: n - n // 2]])
    train = torch.cat(parts)
    return x[train], y[train], x[victims]


def q(a: np.ndarray) -> dict:
    return {"mean": round(float(a.mean()), 4), "median": round(float(np.median(a)), 4),
            "max": round(float(a.max()), 4), "min": round(float(a.min()), 4)}


def one(size: int, n: int) -> list[dict]:
    xtr, ytr, xv = split(size, n)
    torch.manual_seed(1234)
    F = fit(LeNet5(1, 2), xtr, ytr, epochs=30, seed=1234)
    flat = audit.flat_ssim(xv)
    rows = []
    for mode, steps in SETTINGS:
        t0 = time.perf_counter()
        key = hashlib.sha256(f"gate_calibration/{size}/{mode}".encode()).digest()
        v = VF.veil(F, xv, key=key, mode=mode, steps=steps, device="cpu")
        t_veil = time.perf_counter() - t0
        rep, rep_null = audit.run(xv, v, reid_gallery=0), audit.run(xv, v.roll(n // 2, 0), reid_gallery=0)
        attack, null = np.asarray(rep.per_sample_max), np.asarray(rep_null.per_sample_max)
        gain, null_gain = np.asarray(rep.per_sample_gain), np.asarray(rep_null.per_sample_gain)
        refused = {"absolute": int((attack > BAR).sum())}
        refused.update({f"gain>{g:g}": int(((attack > BAR) & (gain > g)).sum()) for g in GAINS})
        null_refused = {"absolute": int((null > BAR).sum())}
        null_refused.update({f"gain>{g:g}": int(((null > BAR) & (null_gain > g)).sum()) for g in GAINS})
        rows.append(dict(size=size, mode=mode, steps=steps, n=n, attack=q(attack), flat=q(flat), gain=q(gain),
                         null=q(null), null_gain=q(null_gain), refused=refused, null_refused=null_refused,
                         seconds=round(time.perf_counter() - t0, 1), veil_seconds=round(t_veil, 1)))
        print(f"{size:>3} px {mode:8s}: attack {q(attack)}, flat {q(flat)}, gain {q(gain)}, null gain {q(null_gain)}; "
              f"refused {refused}; null refused {null_refused}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 64, 128])
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--out-name", default="gate_calibration")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [r for s in a.sizes for r in one(s, a.n)]
    cmd = "python benchmarks/gate_calibration.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    lines = [f"# Gate calibration: absolute attack SSIM against SSIM beyond a flat image ({platform.processor() or platform.machine()}, 1 thread)",
             "", f"`{cmd}` ({time.perf_counter() - t0:.0f} s; LFW crops upscaled to each size, {a.n} veiled per "
             "setting, F = LeNet-5 trained on 140 of them; one key per setting)", "",
             "attack: each sample's strongest key-free attack SSIM (the gate's score); flat: `audit.flat_ssim`; "
             "gain: `AuditReport.per_sample_gain` (per reference, (attacks' best - flat) / (1 - flat); the max); null: the attacks on another image's veil, scored against this image. "
             f"Refused: samples over the absolute bar {BAR}, and over it with a gain above g.", "",
             "| size | veil | attack mean / max | flat mean / max | gain median / max | null gain max | refused: absolute | "
             + " | ".join(f"gain > {g:g}" for g in GAINS) + " | null refused: absolute / gain > 0.1 |",
             "|---" * (8 + len(GAINS)) + "|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['mode']} {r['steps']} x 1 | {r['attack']['mean']:.3f} / {r['attack']['max']:.3f} | "
                     f"{r['flat']['mean']:.3f} / {r['flat']['max']:.3f} | {r['gain']['median']:+.3f} / {r['gain']['max']:+.3f} | "
                     f"{r['null_gain']['max']:+.3f} | {r['refused']['absolute']}/{r['n']} | "
                     + " | ".join(f"{r['refused'][f'gain>{g:g}']}" for g in GAINS)
                     + f" | {r['null_refused']['absolute']} / {r['null_refused']['gain>0.1']} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.out_name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{a.out_name}.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
