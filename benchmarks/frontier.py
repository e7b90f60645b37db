"""Utility-privacy frontier of the veil modes ("paper" and "hardened") on MNIST and real LFW faces.

    python benchmarks/frontier.py            # reduced sizes for a 2-core CPU (about 45 min)
    python benchmarks/frontier.py --full     # MNIST 8000/2000, 5 seeds, learned + inversion attacks everywhere (GPU)

For each data set and each veil setting (mode, lr, steps, veils per image k):

1. the owner trains a local model F (LeNet-5) on the training images and veils them
   (library ``veil``, one key; ``k`` veils per image use ``k`` keys);
2. a third party trains LeNet-5 on (veiled images, labels), one model per seed, with two
   recipes: ``plain`` (``training.fit`` defaults) and ``noise`` (Gaussian input noise
   ``hardened.NOISE_SIGMA`` on the [-1, 1] scale and ``hardened.EPOCH_FACTOR`` x the epochs);
   utility = its accuracy on the ORIGINAL test images (mean +- sd over seeds), next to a baseline
   trained on the originals with the same recipe;
3. privacy = ``veil_transforms.audit.run`` on the veiled training images (victims): every cheap
   keyless attack (identity, fold, fold + denoisers, Sobel edges, sign recovery), and for the
   library-default setting of each mode (all settings with --full) also the adaptive U-Net
   inverter (``learned``) and logit-matching ``inversion`` against the seed-0 plain model.
   With k > 1 the averaging attack (mean of the k veils of an image) is audited too.
   Privacy score = the strongest attack's mean SSIM (and the worst single sample);
4. cost = veil seconds per image (per veil), same chunk size for every setting; the ratio is
   to the paper mode at the same lr and steps (or at lr 0.1).

Reference levels printed with each table: the best blank guess (black / grey / white / mean
image) and the label-only guess (the public class-mean image for each victim's own label): a
veil that lets a model learn the labels cannot keep a learned inverter below the latter.

Writes benchmarks/results/frontier{,_full}.{md,json,png}. Veils are cached under
benchmarks/.cache/ (keyed by sizes, settings and the source of functional.py / hardened.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402
from veil_transforms import audit  # noqa: E402
from veil_transforms import functional as VF  # noqa: E402
from veil_transforms import hardened as H  # noqa: E402
from veil_transforms.data import load_mnist  # noqa: E402
from veil_transforms.metrics import ssim  # noqa: E402
from veil_transforms.nets import LeNet5  # noqa: E402
from veil_transforms.training import accuracy, fit  # noqa: E402

RESULTS = HERE / "results"
CACHE = HERE / ".cache"

# (mode, lr, steps, k); the first of each mode is its library default (gets the expensive attacks)
SETTINGS = [
    ("paper", 0.1, 300, 1), ("paper", 0.01, 300, 1), ("paper", 1.0, 300, 1),
    ("hardened", 0.1, 300, 1), ("hardened", 0.3, 300, 1), ("hardened", 0.1, 150, 2), ("hardened", 0.1, 75, 4),
    ("hardened", 0.1, 40, 8),
]
REDUCED = dict(mnist=(2000, 1000), mnist_seeds=[0, 1, 2], mnist_epochs=15, mnist_victims=500, mnist_public=600,
               lfw_seeds=[0, 1, 2, 3, 4], lfw_epochs=40, unet_epochs=20, expensive="defaults")
FULL = dict(mnist=(8000, 2000), mnist_seeds=[0, 1, 2, 3, 4], mnist_epochs=15, mnist_victims=2000, mnist_public=2000,
            lfw_seeds=list(range(10)), lfw_epochs=40, unet_epochs=300, expensive="all")
RECIPES = ("plain", "noise")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def source_hash() -> str:
    """Hash of the veil code (functional.py, hardened.py, keys.py), ignoring comments and docstrings."""
    import ast

    pkg = Path(VF.__file__).parent
    h = hashlib.sha256()
    for f in ("functional.py", "hardened.py", "keys.py"):
        tree = ast.parse((pkg / f).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:12]


def veil_cached(F, x, *, name, mode, lr, steps, key_index, device):
    """Veil ``x``; returns (uint8 veils, seconds). Cached on disk by everything that changes the result."""
    key = H.copy_keys(hashlib.sha256(f"frontier/{name}".encode()).digest(), key_index + 1)[key_index]
    fp_model = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in F.parameters())).hexdigest()[:12]
    tag = hashlib.sha256(json.dumps([name, mode, lr, steps, key_index, len(x), fp_model, source_hash(),
                                     str(torch.device(device).type)]).encode()).hexdigest()[:16]
    path = CACHE / f"frontier_{tag}.pt"
    if path.exists():
        d = torch.load(path)
        return d["v"], d["seconds"]
    t0 = time.perf_counter()
    v = VF.veil(F, x, key=key, mode=mode, lr=lr, steps=steps, device=device, chunk=512)
    sec = time.perf_counter() - t0
    CACHE.mkdir(exist_ok=True)
    torch.save({"v": v, "seconds": sec}, path)
    return v, sec


def train_g(x, y, nc, *, recipe, epochs, seed, device):
    torch.manual_seed(seed)
    m = LeNet5(x.shape[1], nc)
    if recipe == "plain":
        return fit(m, x, y, epochs=epochs, seed=seed, device=device)
    return fit(m, x, y, epochs=epochs * H.EPOCH_FACTOR, seed=seed, device=device, augment=H.noise_augment())


def label_only_ssim(x_vic, y_vic, x_pub, y_pub) -> float:
    """Mean SSIM of each victim to the public mean image of its own class (what the label alone gives)."""
    means = torch.stack([x_pub[y_pub == c].float().mean(0) if (y_pub == c).any() else x_pub.float().mean(0)
                         for c in range(int(y_vic.max()) + 1)]).round().to(torch.uint8)
    return float(ssim(x_vic, means[y_vic]).mean())


def run_dataset(name, train, test, public, nc, *, seeds, epochs, n_victims, unet_epochs, expensive, device, settings):
    (xtr, ytr), (xte, yte), (xp, yp) = train, test, public
    torch.manual_seed(1234)
    F = fit(LeNet5(xtr.shape[1], nc), xtr, ytr, epochs=epochs, seed=1234, device=device)
    out = dict(n_train=len(xtr), n_test=len(xte), n_victims=n_victims, n_public=len(xp), seeds=seeds, epochs=epochs,
               local_model_acc=accuracy(F, xte, yte, device=device), baseline={}, rows=[])
    for recipe in RECIPES:
        accs = [accuracy(train_g(xtr, ytr, nc, recipe=recipe, epochs=epochs, seed=s, device=device), xte, yte, device=device)
                for s in seeds]
        out["baseline"][recipe] = dict(mean=100 * float(np.mean(accs)), sd=100 * float(np.std(accs)), runs=accs)
        log(f"[{name}] baseline {recipe}: {out['baseline'][recipe]['mean']:.2f} ± {out['baseline'][recipe]['sd']:.2f}")
    xv, yv = xtr[:n_victims], ytr[:n_victims]
    out["label_only_ssim"] = label_only_ssim(xv, yv, xp, yp)
    first = {}
    for mode, lr, steps, k in settings:
        row = dict(mode=mode, lr=lr, steps=steps, k=k)
        vs, secs = zip(*[veil_cached(F, xtr, name=name, mode=mode, lr=lr, steps=steps, key_index=i, device=device)
                         for i in range(k)])
        row["sec_per_img"] = float(np.sum(secs) / (k * len(xtr)))
        vt, yt = torch.cat(vs), ytr.repeat(k)
        models = {}
        for recipe in RECIPES:
            accs = []
            for s in seeds:
                g = train_g(vt, yt, nc, recipe=recipe, epochs=epochs, seed=s, device=device)
                accs.append(accuracy(g, xte, yte, device=device))
                if recipe == "plain" and s == seeds[0]:
                    models["plain"] = g
            row[f"acc_{recipe}"] = dict(mean=100 * float(np.mean(accs)), sd=100 * float(np.std(accs)), runs=accs)
        is_default = mode not in first
        first.setdefault(mode, (lr, steps))
        run_expensive = expensive == "all" or (expensive == "defaults" and is_default)
        kw = dict(reid_gallery=100, device=device)
        if run_expensive:
            kw.update(model=models["plain"], learned=dict(
                public_images=xp, public_labels=yp, make_model=lambda: LeNet5(xtr.shape[1], nc), epochs=epochs,
                unet_epochs=unet_epochs, veil_kwargs=dict(mode=mode, lr=lr, steps=steps), seed=0))
        t0 = time.perf_counter()
        rep = audit.run(xv, vs[0][:n_victims], **kw)
        row["audit_seconds"] = time.perf_counter() - t0
        a = rep.as_dict(per_sample=False)
        row["audit"] = {n: dict(mean=v["mean_ssim"], max=v["max_ssim"], reid=v.get("reid_top1")) for n, v in a["attacks"].items()}
        row["fold_ssim"] = a["attacks"]["fold"]["variants"]["fold vs fold(x)"]
        row["ssim_x_xv"] = a["attacks"]["identity"]["variants"]["x~ vs x"]
        row["blank_ssim"] = a["blank_ssim"]
        row["max_attack_mean"], row["worst_attack"], row["max_attack_sample"] = rep.max_mean_ssim, rep.worst_attack, rep.max_ssim
        if k > 1:
            avg = audit.average_copies(torch.stack([v[:n_victims] for v in vs]))
            ra = audit.run(xv, avg, reid_gallery=100)
            row["audit"]["average_of_k"] = dict(mean=ra.max_mean_ssim, max=ra.max_ssim, worst=ra.worst_attack)
            if ra.max_mean_ssim > row["max_attack_mean"]:
                row["max_attack_mean"], row["worst_attack"] = ra.max_mean_ssim, f"average_of_k+{ra.worst_attack}"
            row["max_attack_sample"] = max(row["max_attack_sample"], ra.max_ssim)
        row["expensive_attacks"] = run_expensive
        out["rows"].append(row)
        log(f"[{name}] {mode} lr {lr} steps {steps} k {k}: acc plain {row['acc_plain']['mean']:.2f} ± {row['acc_plain']['sd']:.2f}, "
            f"noise {row['acc_noise']['mean']:.2f} ± {row['acc_noise']['sd']:.2f}; max attack {row['max_attack_mean']:.3f} "
            f"({row['worst_attack']}); fold {row['fold_ssim']:.3f}; {row['sec_per_img'] * 1e3:.1f} ms/img")
    for row in out["rows"]:
        ref = next((r for r in out["rows"] if r["mode"] == "paper" and r["lr"] == row["lr"] and r["steps"] == row["steps"]), None)
        ref = ref or next(r for r in out["rows"] if r["mode"] == "paper" and r["lr"] == 0.1)
        row["time_ratio"] = row["sec_per_img"] / ref["sec_per_img"]
    return out


# --------------------------------------------------------------------------- report
def setting_name(r) -> str:
    return f"{r['mode']} lr {r['lr']:g}" + (f", {r['steps']} steps" if r["steps"] != 300 else "") + (f", k={r['k']}" if r["k"] > 1 else "")


def render(res: dict) -> str:
    L = [f"# Utility-privacy frontier: paper vs hardened veil ({'full' if res['full'] else 'reduced'} sizes)", "",
         f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min, {res['device_name']}).", "",
         "Utility: LeNet-5 trained by a third party on the veiled training images, accuracy on the ORIGINAL test "
         "images, mean ± sd over seeds; recipes `plain` (fit defaults) and `noise` (Gaussian input noise "
         f"sigma {H.NOISE_SIGMA} on [-1, 1], {H.EPOCH_FACTOR}x epochs). Privacy: `veil_transforms.audit` on the veiled "
         "training images; `max attack` = the strongest attack's mean SSIM (worst single sample in brackets); "
         "`U-Net` / `inversion` columns only where those attacks ran. Time: veil ms per image (per veil, CPU chunk "
         "512) and the ratio to the paper mode at the same lr and steps (lr 0.1 otherwise); k veils per image "
         "cost k times that per original image. The CPU is shared, so times vary by about +-30% between settings. "
         "The U-Net and inversion attacks run only on the first setting of each mode in the reduced run: "
         "elsewhere `max attack` covers the cheap attacks only.", ""]
    for name, d in res["datasets"].items():
        b = d["baseline"]
        L += [f"## {name}: train {d['n_train']}, test {d['n_test']}, audited victims {d['n_victims']}, "
              f"attacker's public split {d['n_public']}, seeds {d['seeds']}, {d['epochs']} epochs", "",
              f"Baseline (trained on originals): plain {b['plain']['mean']:.2f} ± {b['plain']['sd']:.2f}%, "
              f"noise recipe {b['noise']['mean']:.2f} ± {b['noise']['sd']:.2f}%. Local model F: {100 * d['local_model_acc']:.1f}%. "
              f"Reference SSIMs: best blank guess {d['rows'][0]['blank_ssim']:.3f}; label-only guess (public class-mean "
              f"image of the victim's label) {d['label_only_ssim']:.3f}.", "",
              "| setting | veiled on X, plain | veiled on X, noise recipe | fold SSIM | SSIM(X, X~) | max attack mean (worst sample) | "
              "strongest attack | U-Net mean / re-id | inversion mean | ms/img | time ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            au = r["audit"]
            un = f"{au['learned']['mean']:.3f} / {100 * (au['learned']['reid'] or 0):.0f}%" if "learned" in au else "-"
            inv = f"{au['inversion']['mean']:.3f}" if "inversion" in au else "-"
            L.append(f"| {setting_name(r)} | {r['acc_plain']['mean']:.2f} ± {r['acc_plain']['sd']:.2f} | "
                     f"{r['acc_noise']['mean']:.2f} ± {r['acc_noise']['sd']:.2f} | {r['fold_ssim']:.3f} | {r['ssim_x_xv']:.3f} | "
                     f"{r['max_attack_mean']:.3f} ({r['max_attack_sample']:.2f}) | {r['worst_attack']} | {un} | {inv} | "
                     f"{1e3 * r['sec_per_img']:.1f} | {r['time_ratio']:.2f} |")
        L.append("")
    if res.get("notes"):
        L += ["Notes:", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(L)


def plot(res: dict, path: Path) -> None:
    """Accuracy on X (y) against the strongest attack's mean SSIM (x), one panel per data set (PIL only)."""
    from PIL import Image, ImageDraw

    names = list(res["datasets"])
    W, Hh, m = 520, 420, 60
    img = Image.new("RGB", (W * len(names), Hh), "white")
    dr = ImageDraw.Draw(img)
    colors = {"paper": (200, 40, 40), "hardened": (30, 80, 200)}
    for p, name in enumerate(names):
        d = res["datasets"][name]
        ox = p * W
        accs = [r[f"acc_{rc}"]["mean"] for r in d["rows"] for rc in RECIPES] + [d["baseline"][rc]["mean"] for rc in RECIPES]
        y0, y1 = max(0.0, 5 * np.floor(min(accs) / 5) - 5), min(100.0, 5 * np.ceil(max(accs) / 5) + 1)
        x0, x1 = 0.0, max(0.8, max(r["max_attack_mean"] for r in d["rows"]) + 0.05)
        X = lambda v: ox + m + (v - x0) / (x1 - x0) * (W - 2 * m)  # noqa: E731
        Y = lambda v: Hh - m - (v - y0) / (y1 - y0) * (Hh - 2 * m)  # noqa: E731
        dr.rectangle([X(x0), Y(y1), X(x1), Y(y0)], outline="black")
        for t in np.arange(0, x1 + 1e-9, 0.1):
            dr.line([X(t), Y(y0), X(t), Y(y0) + 4], fill="black")
            dr.text((X(t) - 8, Y(y0) + 6), f"{t:.1f}", fill="black")
        for t in np.arange(y0, y1 + 1e-9, 5):
            dr.line([X(x0) - 4, Y(t), X(x0), Y(t)], fill="black")
            dr.text((X(x0) - 30, Y(t) - 5), f"{t:.0f}", fill="black")
        for i, (v, lab, col) in enumerate(((0.15, "bar 0.15", (0, 150, 0)), (d["label_only_ssim"], "label-only guess", (130, 130, 130)),
                                           (d["rows"][0]["blank_ssim"], "blank guess", (170, 170, 170)))):
            for yy in range(int(Y(y1)), int(Y(y0)), 8):
                dr.line([X(v), yy, X(v), yy + 4], fill=col)
            dr.text((X(v) + 2, Y(y1) + 2 + 12 * i), lab, fill=col)
        for rc in RECIPES:
            bl = d["baseline"][rc]["mean"]
            for xx in range(int(X(x0)), int(X(x1)), 8 if rc == "plain" else 16):
                dr.line([xx, Y(bl), xx + 4, Y(bl)], fill="black")
            dr.text((X(x1) - 150, Y(bl) - (12 if rc == "noise" else -2)), f"baseline ({rc}) {bl:.1f}%", fill="black")
        for r in d["rows"]:
            c = colors[r["mode"]]
            for rc in RECIPES:
                cx, cy = X(r["max_attack_mean"]), Y(r[f"acc_{rc}"]["mean"])
                sd = r[f"acc_{rc}"]["sd"]
                dr.line([cx, Y(r[f"acc_{rc}"]["mean"] - sd), cx, Y(r[f"acc_{rc}"]["mean"] + sd)], fill=c)
                box = [cx - 4, cy - 4, cx + 4, cy + 4]
                dr.ellipse(box, fill=c) if rc == "plain" else dr.ellipse(box, outline=c, width=2)
            dr.text((cx + 6, Y(r["acc_plain"]["mean"]) - 5), setting_name(r).split(" ", 1)[1], fill=c)
        dr.text((ox + m, 8), f"{name}: veiled-model accuracy on X (%) vs strongest attack mean SSIM", fill="black")
        dr.text((ox + m, 22), "red = paper, blue = hardened; filled = plain recipe, ring = noise recipe", fill="black")
        dr.text((ox + W // 2 - 60, Hh - 22), "max attack mean SSIM (lower = more private)", fill="black")
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="MNIST 8000/2000, more seeds, U-Net 300 epochs, expensive attacks on every setting")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--skip-lfw", action="store_true")
    ap.add_argument("--out-name", default=None, help="results file stem (default frontier / frontier_full)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png of a saved results .json")
    args = ap.parse_args(argv)
    if args.render:
        p = Path(args.render)
        res = json.loads(p.read_text())
        p.with_suffix(".md").write_text(render(res))
        plot(res, p.with_suffix(".png"))
        return
    C.setup(args.device)
    S = FULL if args.full else REDUCED
    t0 = time.perf_counter()
    res = dict(command=" ".join(["python benchmarks/frontier.py", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
               full=args.full, device=args.device, device_name=C.device_name(args.device), sizes=S,
               settings=SETTINGS, datasets={}, notes=[])
    if not args.skip_mnist and C.mnist_data(1, 1) is not None:
        x, y = load_mnist()
        ntr, nte = S["mnist"]
        train, test = (x[:ntr], y[:ntr]), (x[len(x) - nte :], y[len(y) - nte :])
        public = (x[ntr : ntr + S["mnist_public"]], y[ntr : ntr + S["mnist_public"]])
        res["datasets"]["mnist"] = run_dataset("mnist", train, test, public, 10, seeds=S["mnist_seeds"], epochs=S["mnist_epochs"],
                                               n_victims=S["mnist_victims"], unet_epochs=S["unet_epochs"],
                                               expensive=S["expensive"], device=args.device, settings=SETTINGS)
    elif not args.skip_mnist:
        res["notes"].append("MNIST skipped: ../shared/data/mnist is absent")
    if not args.skip_lfw:
        train, test = C.lfw_split(0)
        res["datasets"]["lfw"] = run_dataset("lfw", train, test, test, 2, seeds=S["lfw_seeds"], epochs=S["lfw_epochs"],
                                             n_victims=len(train[0]), unet_epochs=3 * S["unet_epochs"],
                                             expensive=S["expensive"], device=args.device, settings=SETTINGS)
        res["notes"].append("LFW: scikit-image's 200 crops (face / not a face), stratified 140/60 split 0 of "
                            "benchmarks/_common.py; the attacker's public split is the 60 test images (disjoint from the victims)")
    if not res["datasets"]:  # (it wrote an empty table and then failed on an empty plot)
        raise SystemExit(f"frontier.py: nothing to run: {'; '.join(res['notes']) or 'both data sets skipped'}")
    if not args.full:
        res["notes"].append(f"reduced run: the U-Net inverter trains {S['unet_epochs']} epochs (x3 on LFW), which under-trains it "
                            "(see benchmarks/results/security.md); --full trains 300")
    res["total_seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    stem = args.out_name or ("frontier_full" if args.full else "frontier")
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (RESULTS / f"{stem}.md").write_text(render(res))
    plot(res, RESULTS / f"{stem}.png")
    print(render(res))


if __name__ == "__main__":
    main()
