"""veil-demo: the whole story on real faces, offline, in a couple of minutes on a CPU.

    veil-demo [OUT] [--quick] [--mode paper]

Uses scikit-image's LFW subset (200 grey 25x25 crops: 100 faces, 100 not
faces; nothing is downloaded):

1. the data owner trains a local LeNet-5 F on a stratified 140/60 split;
2. writes the 140 training images as an ImageFolder (OUT/src) and veils them
   into WebDataset shards with veil-shard (the same function as the CLI);
3. a "third party" trains a LeNet-5 from the shards alone (``shards.load``);
4. both are evaluated on the original test images (and on veiled ones);
5. OUT/report.md gets the table (also printed) and OUT/grid.png shows
   originals, veiled images and the fold attack ``|2 x~ - 1|``.

OUT is wiped of earlier demo outputs only when it holds the ``.veil-demo`` marker.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from veil_transforms import functional as F

from ._common import debug, fail, int_at_least, setup_logging, torch_threads

PROG = "veil-demo"
MARKER = ".veil-demo"
PRODUCTS = ("src", "shards", "shards.key", "local_model.pt", "report.md", "grid.png")
CLASSES = ("0-not-face", "1-face")  # sorted folder names give label 0 = not a face, 1 = face


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Veil Privacy end to end on real faces (LFW subset).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", metavar="OUT", nargs="?", default="veil-demo-out", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer veil steps and epochs (for tests)")
    p.add_argument("--mode", default="paper", choices=sorted(F.MODES), help="veil algorithm")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="veil steps; None: 300, or 40 with --quick")
    p.add_argument("--epochs", type=int_at_least(1), default=None, help="training epochs; None: 40, or 15 with --quick")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (LeNet-sized work runs fastest on one, and a busy machine makes more much slower)")
    return p


def _split(y, seed: int, n_test_per_class: int = 30):
    import torch

    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for c in sorted(set(y.tolist())):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        te.append(idx[:n_test_per_class])
        tr.append(idx[n_test_per_class:])
    return torch.cat(tr).sort().values, torch.cat(te).sort().values


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"OUT {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise ValueError(f"OUT {out} is not empty and not an earlier veil-demo output; pick another OUT")
        for name in PRODUCTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("veil-demo output folder; veil-demo may delete what it wrote here\n")


def _grid(rows: list[np.ndarray], path: Path, scale: int = 4, gap: int = 2) -> None:
    """rows of uint8 [N, 1, H, W] images -> one PNG, upscaled (nearest) for visibility."""
    import PIL.Image

    n, _, h, w = rows[0].shape
    H, W = h * scale, w * scale
    canvas = np.full((len(rows) * (H + gap) + gap, n * (W + gap) + gap), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for c in range(n):
            tile = np.kron(imgs[c, 0], np.ones((scale, scale), np.uint8))
            y0, x0 = gap + r * (H + gap), gap + c * (W + gap)
            canvas[y0 : y0 + H, x0 : x0 + W] = tile
    PIL.Image.fromarray(canvas).save(path)


def run_demo(out: str | Path = "veil-demo-out", *, quick: bool = False, mode: str = "paper",
             steps: int | None = None, epochs: int | None = None, seed: int = 0, verbose: bool = True) -> dict:
    """Run the demo; returns the results dict (also written to OUT/report.md)."""
    import PIL.Image
    import torch

    from veil_transforms import keys as _keys
    from veil_transforms import shards
    from veil_transforms.data import load_lfw_faces
    from veil_transforms.metrics import ssim
    from veil_transforms.nets import LeNet5
    from veil_transforms.training import accuracy, fit
    from veil_transforms.transform import VeilTransform

    from . import shard as shard_cli
    from .export import fold, fold_attack_ssim

    t0 = time.perf_counter()
    out = Path(out).absolute()
    steps = (40 if quick else F.PAPER["steps"]) if steps is None else steps
    epochs = (15 if quick else 40) if epochs is None else epochs
    say = print if verbose else (lambda *a, **k: None)
    _prepare_out(out)

    # 1. data and the owner's local model F
    x, y = load_lfw_faces()
    tr, te = _split(y, seed)
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    say(f"[1/5] LFW subset: {len(xtr)} train / {len(xte)} test grey 25x25 crops; training the local model F")
    torch.manual_seed(seed + 1234)
    local = fit(LeNet5(1, 2), xtr, ytr, epochs=epochs, seed=seed + 1234)
    torch.jit.script(local).save(str(out / "local_model.pt"))

    # 2. the owner's images as an ImageFolder, veiled into shards by veil-shard
    for c in CLASSES:
        (out / "src" / c).mkdir(parents=True)
    rel_of = []
    for i, (img, lab) in enumerate(zip(xtr, ytr)):
        rel = f"{CLASSES[int(lab)]}/{i:03d}.png"
        PIL.Image.fromarray(img[0].numpy()).save(out / "src" / rel)
        rel_of.append(rel)
    say(f"[2/5] veiling {len(xtr)} images into shards (mode={mode}, steps={steps})")
    t_veil = time.perf_counter()
    argv = [str(out / "src"), str(out / "shards"), "--model", str(out / "local_model.pt"), "--steps", str(steps),
            "--mode", mode, "--shard-size", "50", "--device", "cpu", "--quiet"]
    rc = shard_cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"veil-shard failed with exit code {rc}")
    t_veil = time.perf_counter() - t_veil

    # 3. the third party: only the shards
    got = list(shards.load(out / "shards", with_keys=True))
    vtr = torch.stack([g[0] for g in got])
    vy = torch.tensor([g[1] for g in got])
    say(f"[3/5] third party trains a LeNet-5 on {len(vtr)} veiled images read from the shards")
    third = fit(LeNet5(1, 2), vtr, vy, epochs=epochs, seed=seed)
    baseline = fit(LeNet5(1, 2), xtr, ytr, epochs=epochs, seed=seed)

    # 4. evaluation (the owner matches veiled samples to originals with the key)
    key = _keys.read_key_file(out / "shards.key")
    index = {_keys.opaque_key(key, rel): i for i, rel in enumerate(rel_of)}
    order = torch.tensor([index[g[2]] for g in got])
    x_matched = xtr[order]
    veil = VeilTransform(torch.jit.load(str(out / "local_model.pt")), key=key, steps=steps, mode=mode, device="cpu")
    vte = veil.veil_batch(xte)
    say("[4/5] evaluating on the original (and veiled) test images")
    s = ssim(x_matched, vtr)
    fa = fold_attack_ssim(x_matched.numpy(), vtr.numpy())
    res = {
        "baseline_acc": accuracy(baseline, xte, yte),
        "veiled_acc_on_Xv": accuracy(third, vte, yte),
        "veiled_acc_on_X": accuracy(third, xte, yte),
        "local_acc": accuracy(local, xte, yte),
        "ssim_mean": float(s.mean()), "ssim_max": float(s.max()),
        "fold_ssim_mean": float(fa.mean()), "fold_ssim_max": float(fa.max()),
        "n_train": len(xtr), "n_test": len(xte), "steps": steps, "epochs": epochs, "mode": mode,
        "veil_seconds": t_veil,
    }

    # 5. report and grid
    pick = torch.cat([torch.nonzero(vy == 1).flatten()[:4], torch.nonzero(vy == 0).flatten()[:4]])
    orig_u8, veil_u8 = x_matched[pick].numpy(), vtr[pick].numpy()
    fold_u8 = (fold(veil_u8) * 255).round().astype(np.uint8)
    _grid([orig_u8, veil_u8, fold_u8], out / "grid.png")
    res["seconds"] = time.perf_counter() - t0
    table = report_table(res)
    (out / "report.md").write_text(
        "# veil-demo: Veil Privacy on LFW faces\n\n"
        f"{len(xtr)} training / {len(xte)} test crops (25x25 grey, face vs not a face), LeNet-5 everywhere, "
        f"veil mode `{mode}`, {steps} steps, {epochs} training epochs, seed {seed}.\n"
        "The third-party model saw only the veiled shards; accuracy is on held-out test images.\n\n"
        f"{table}\n\n"
        f"Local model F (trained by the owner on X): {res['local_acc']:.3f} test accuracy.\n"
        f"Veiling {len(xtr)} images took {t_veil:.1f} s; the whole demo {res['seconds']:.1f} s.\n\n"
        "![originals (top), veiled (middle), fold attack |2x~-1| (bottom)](grid.png)\n\n"
        "Rows of grid.png: originals, veiled images, fold attack |2 x~ - 1|.\n"
    )
    say("[5/5] report: " + str(out / "report.md") + ", grid: " + str(out / "grid.png"))
    say("")
    say(table)
    say(f"\n(demo took {res['seconds']:.1f} s)")
    return res


def report_table(r: dict) -> str:
    rows = [
        ("baseline accuracy (trained on X, tested on X)", f"{r['baseline_acc']:.3f}"),
        ("veiled-model accuracy on veiled test images X~", f"{r['veiled_acc_on_Xv']:.3f}"),
        ("veiled-model accuracy on original test images X", f"{r['veiled_acc_on_X']:.3f}"),
        ("SSIM(X, X~) mean (max)", f"{r['ssim_mean']:.4f} ({r['ssim_max']:.4f})"),
        ("fold-attack SSIM, abs(2X~-1) vs abs(2X-1), mean (max)", f"{r['fold_ssim_mean']:.4f} ({r['fold_ssim_max']:.4f})"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'measure'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a.ljust(w)} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        with torch_threads(max(args.threads, 0)):
            run_demo(args.out, quick=args.quick, mode=args.mode, steps=args.steps, epochs=args.epochs,
                     seed=args.seed)
    except (ValueError, OSError) as e:
        if debug():
            raise
        return fail(PROG, e, 2)
    except Exception as e:  # noqa: BLE001
        if debug():
            raise
        return fail(PROG, f"{type(e).__name__}: {e}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
