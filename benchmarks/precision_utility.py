"""Do the veil's speed options cost utility? MNIST, LeNet-5, paper or hardened mode (--mode), paired over keys and seeds.

    python benchmarks/precision_utility.py --device cuda [--n-train 8000] [--n-test 2000] [--seeds 0 1 2 3 4] [--keys 1]
        [--trainer one|many] [--block 1] [--chunk 128]

Trains the owner's F on the first ``n-train`` MNIST images, veils them once per
config and key (the fp32 reference, then the fast configs: bf16 autocast, CUDA
graph, torch.compile; on the CPU bf16 only), trains a third-party LeNet-5 on
each veiled set for every seed, and tests on the last ``n-test`` original
images. Every config uses the same keys and seeds, so the differences to fp32
are paired. A bf16 and an fp32 veil of the same key are different images, and
the third-party training on them is noisy (seeds of one veil differ by up to 6
points on 8,000 MNIST images), so one key's paired difference ranged from -1.6
to +1.1 points (precision_utility_cpu_keys6.md): one key cannot resolve the
issue's bar (veiled-model accuracy on X within 0.5 points of the fp32 veil).
Use ``--keys`` > 1; the standard error is then taken over keys. Also reports
Eq. (2)'s loss in fp32 on the uint8 veils, how far each veil is from the fp32
veil (mean |diff| in grey levels, flip-sign agreement on pixels with
|x| > 0.5) and F's argmax agreement with the originals.

On a GPU, ``--trainer many --block B`` veils B keys, then trains their B x configs x seeds
third-party models together with ``training.fit_many`` (vmapped, the same recipe and batch order as
``fit``): tens of LeNets train in about the time of one, which is what makes tens of keys affordable.

Writes benchmarks/results/precision_utility_<device>[_keys<N>].{md,json}
(the json after every block of keys, so a run cut off keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from veil_transforms import functional as F
from veil_transforms.data import mnist_split
from veil_transforms.nets import LeNet5
from veil_transforms.training import accuracy, fit, fit_many, predict

CONFIGS = {
    "fp32 (reference)": {},
    "fp32 + CUDA graph + compile": {"cuda_graph": True, "compile": True},
    "bf16 + CUDA graph": {"precision": "bf16", "cuda_graph": True},
    "bf16 + CUDA graph + compile": {"precision": "bf16", "cuda_graph": True, "compile": True},
}


def lenet(seed: int) -> LeNet5:
    torch.manual_seed(seed)  # same initial weights for every config: the comparison is paired
    return LeNet5()


def key_for(k: int) -> bytes:
    """The k-th veil key (key 0 is the one earlier single-key runs used)."""
    return bytes((i + 37 * k) % 256 for i in range(32))


def paired(accs, ref):
    """Paired differences to the reference, [keys, seeds] each: (mean, standard error, per-key means).

    With several keys the error comes from the spread of the per-key means (a key's paired veils are the
    unit: the seeds of one key share its pair of veils, so they are not independent); with one key, from
    the spread over seeds, which leaves the veils' own variation out.
    """
    d = np.asarray(accs) - np.asarray(ref)
    per_key = d.mean(1)
    if len(per_key) > 1:
        se = per_key.std(ddof=1) / np.sqrt(len(per_key))
    else:
        se = d[0].std(ddof=1) / np.sqrt(d.shape[1]) if d.shape[1] > 1 else float("nan")
    return float(d.mean()), float(se), per_key.tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--keys", type=int, default=1,
                    help="veil every config with this many keys (veil draws); the paired differences are averaged over them")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--trainer", choices=["one", "many"], default="one",
                    help="third-party models: 'one' at a time (fit), or 'many' at once (fit_many, vmapped; for a GPU)")
    ap.add_argument("--block", type=int, default=1, help="keys veiled before their models are trained (with --trainer many: "
                    "block x configs x seeds models per round, up to --chunk at once)")
    ap.add_argument("--chunk", type=int, default=128, help="--trainer many: most models trained at once")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS)[1:],
                    help="CUDA: fast configs to compare with fp32 (default: all)")
    ap.add_argument("--mode", default="paper", choices=["paper", "hardened"],
                    help="veil mode (hardened: results file precision_utility_<device>_hardened...)")
    ap.add_argument("--steps", type=int, default=F.PAPER["steps"], help="gradient-iteration steps (hardened recipe: 75)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the models trained on originals")
    args = ap.parse_args(argv)
    if min(args.keys, args.block, args.chunk) < 1:
        ap.error("--keys, --block and --chunk must be at least 1")
    dev = torch.device(args.device)
    torch.set_flush_denormal(True)
    configs = CONFIGS if dev.type == "cuda" else {"fp32 (reference)": {}, "bf16": {"precision": "bf16"}}
    if args.configs and dev.type == "cuda":
        configs = {k: v for k, v in CONFIGS.items() if k == "fp32 (reference)" or k in args.configs}
    try:
        (xtr, ytr), (xte, yte) = mnist_split(args.n_train, args.n_test)
    except FileNotFoundError as e:  # no MNIST here: say so in one line
        raise SystemExit(f"{Path(__file__).name}: {e}") from None
    owner = fit(lenet(1234), xtr, ytr, epochs=args.epochs, seed=1234, device=dev)
    # models trained on the originals, per seed, by the same trainer as the veiled ones
    baseline = [] if args.no_baseline else list(train_third_party({(None, "originals"): xtr}, ytr, (xte, yte), args, dev).values())
    if baseline:
        print(f"baseline {100 * np.mean(baseline):.2f} ± {100 * np.std(baseline):.2f}", flush=True)
    f_orig = predict(owner, xtr, device=dev)
    xn = F.normalize(xtr).to(dev)
    big = F.normalize(xtr).abs() > 0.5  # pixels whose flip sign is compared across veils
    with torch.no_grad():
        target = owner(xn)
    rows = {label: {"veil_seconds_incl_warmup": [], "acc_on_X": [], "F_agreement": [], "true_loss": []} for label in configs}
    suffix = ("_hardened" if args.mode == "hardened" else "") + (f"_keys{args.keys}" if args.keys > 1 else "")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    cmd = "python benchmarks/precision_utility.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    train_s = 0.0
    for k0 in range(0, args.keys, args.block):  # veil a block of keys, then train all its third-party models
        block = range(k0, min(k0 + args.block, args.keys))
        veils, measured = {}, {}
        for k in block:
            ref = None
            for label, opts in configs.items():
                t = time.perf_counter()
                try:
                    vq = F.veil(owner, xtr, key=key_for(k), device=dev, mode=args.mode, steps=args.steps,
                                **opts).cpu()  # uint8: what a third party gets
                except Exception as e:  # noqa: BLE001 - e.g. torch.compile missing a compiler: report, go on
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"key {k}", label, "FAILED:", msg, flush=True)
                    rows[label].setdefault("failed", []).append({"key": k, "error": msg})
                    if ref is None:  # no fp32 veil of this key: nothing to pair the others with
                        break
                    continue
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                m = measured[k, label] = {"veil_seconds_incl_warmup": time.perf_counter() - t}
                veils[k, label] = vq
                with torch.no_grad():  # Eq. (2) in fp32 on what the third party gets (lower: closer to F(x))
                    vn = F.normalize(vq).to(dev)
                    m["true_loss"] = float(F.paper_loss(owner(vn), target, vn, xn, F.PAPER["alpha"], F.PAPER["beta"]).mean())
                m["F_agreement"] = float((predict(owner, vq, device=dev) == f_orig).float().mean())
                if ref is None:
                    ref = vq
                else:
                    d = (vq.float() - ref.float()).abs()
                    a, b = F.normalize(ref), F.normalize(vq)
                    m["mean_grey_diff"] = float(d.mean())
                    m["frac_pixels_off_by_more_than_1"] = float((d > 1).float().mean())
                    m["sign_agreement"] = float((a.sign() == b.sign())[big].float().mean())
        t = time.perf_counter()
        accs = train_third_party(veils, ytr, (xte, yte), args, dev)
        train_s += time.perf_counter() - t
        for k in block:
            for label in configs:
                if (k, label) in veils:
                    m = {"key": k, **measured[k, label], "acc_on_X": [accs[k, label, s] for s in args.seeds]}
                    for n, x in m.items():
                        rows[label].setdefault(n, []).append(x)
                    print(f"key {k}", label, json.dumps(m), flush=True)
        data = summarize(rows, args, cmd, name, baseline)  # after every block, so a cut-off run keeps what it measured
        data["train_seconds"] = train_s
        (out / f"precision_utility_{dev.type}{suffix}.json").write_text(json.dumps(data, indent=1))
    md = markdown(data, args)
    (out / f"precision_utility_{dev.type}{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return data


def train_third_party(veils, labels, test, args, dev):
    """Accuracy on the original test images of a LeNet-5 trained on each veil, per seed: {(key, config, seed): acc}
    (in the order of ``veils``, then seeds).

    ``--trainer one`` trains them one after another with ``fit``; ``many`` trains up to ``--chunk`` at once with
    ``fit_many`` (the same recipe and batch order, vmapped: on a GPU, tens of LeNets cost about one).
    """
    xte, yte = test
    jobs = [(k, label, s) for (k, label) in veils for s in args.seeds]
    if args.trainer == "one":
        return {j: accuracy(fit(lenet(j[2]), veils[j[:2]], labels, epochs=args.epochs, seed=j[2], device=dev),
                            xte, yte, device=dev) for j in jobs}
    accs = {}
    for c in range(0, len(jobs), args.chunk):
        part = jobs[c : c + args.chunk]
        models = fit_many([lenet(s) for _, _, s in part], torch.stack([veils[j[:2]] for j in part]), labels,
                          seeds=[s for _, _, s in part], epochs=args.epochs, device=dev)
        accs.update({j: accuracy(m, xte, yte, device=dev) for j, m in zip(part, models)})
    return accs


def summarize(rows, args, cmd, name, baseline):
    """Per config: mean, spreads, and the paired difference to fp32 over the keys both have (a config
    that failed for a key leaves that key out of its own pairing only)."""
    ref = rows["fp32 (reference)"]
    ref_acc = dict(zip(ref.get("key", []), ref["acc_on_X"]))
    configs = {}
    for label, r in rows.items():
        c = dict(r)
        if r["acc_on_X"]:
            a = np.asarray(r["acc_on_X"])
            c.update(mean=float(a.mean()), sd_over_keys=float(a.mean(1).std(ddof=1)) if len(a) > 1 else None,
                     sd_over_seeds=float(a.std(1).mean()))
            both = [i for i, k in enumerate(r["key"]) if k in ref_acc]
            if label != "fp32 (reference)" and both:
                c["paired_keys"] = [r["key"][i] for i in both]
                c["paired_diff_mean"], c["paired_diff_se"], c["paired_diff_per_key"] = paired(
                    a[both], [ref_acc[r["key"][i]] for i in both])
        configs[label] = c
    return {**vars(args), "command": cmd, "device": name, "torch": torch.__version__, "baseline": baseline,  # the card's name, not --device
            "keys_used": [key_for(k).hex() for k in ref.get("key", [])], "configs": configs}


def markdown(data, args):
    P = lambda x: f"{100 * x:.2f}"  # noqa: E731
    nk = len(data["keys_used"])
    md = [f"# Speed options vs utility (MNIST {args.n_train}/{args.n_test}, LeNet-5, {args.mode} mode, {args.steps} steps, lr {F.DEFAULT_LR}, "
          f"{nk} key(s) × seeds {args.seeds}, on {data['device']}, torch {data['torch']})", "",
          f"Third-party models trained {'together (fit_many, vmapped)' if args.trainer == 'many' else 'one at a time (fit)'}"
          + (f" in {data['train_seconds']:.0f} s." if "train_seconds" in data else "."), "", f"Command: `{data['command']}`", "",
          (f"Baseline (trained on originals): {P(np.mean(data['baseline']))} ± {P(np.std(data['baseline']))}%."
           if data["baseline"] else "Baseline not run (--no-baseline)."), "",
          "Paired Δ: the config's accuracy minus fp32's for the same key and third-party seed, averaged; ± is its "
          "standard error " + ("over keys (a veil draw is the unit)." if nk > 1 else "over seeds (one key only: "
                               "the veil-draw spread is not in it)."), "",
          "| veil config | veiled model on X | sd over keys | paired Δ vs fp32 (points) | per-key Δ | Eq. 2 loss (fp32) | "
          "mean \\|Δ\\| vs fp32 veil (grey levels) | pixels off by > 1 | flip-sign agreement | F agreement X~ vs X | veil s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in data["configs"].items():
        if not r["acc_on_X"]:
            md.append(f"| {label} | failed: {(r.get('failed') or [{'error': '?'}])[0]['error']} |" + " |" * 9)
            continue
        pd = "–" if "paired_diff_mean" not in r else f"{100 * r['paired_diff_mean']:+.2f} ± {100 * r['paired_diff_se']:.2f}"
        pk = "–" if "paired_diff_per_key" not in r else " ".join(f"{100 * x:+.1f}" for x in r["paired_diff_per_key"])
        sk = "–" if r["sd_over_keys"] is None else P(r["sd_over_keys"])
        g = lambda n, f=np.mean: f(r[n]) if n in r else None  # noqa: E731
        md.append(f"| {label} | {P(r['mean'])}% | {sk} | {pd} | {pk} | {np.mean(r['true_loss']):.3f} | "
                  f"{g('mean_grey_diff') or 0:.3f} | {P(g('frac_pixels_off_by_more_than_1') or 0)}% | "
                  f"{P(g('sign_agreement') or 1)}% | {P(np.mean(r['F_agreement']))}% | {np.mean(r['veil_seconds_incl_warmup']):.0f} |")
    for label, r in data["configs"].items():
        if r.get("failed"):
            md.append(f"- {label}: failed for {len(r['failed'])} key(s) ({r['failed'][0]['error']}); "
                      "those keys are left out of its pairing.")
        if "paired_diff_mean" in r:
            npk = len(r["paired_keys"])
            dof = (npk if npk > 1 else len(args.seeds)) - 1
            t = t95(dof)
            lo, hi = r["paired_diff_mean"] - t * r["paired_diff_se"], r["paired_diff_mean"] + t * r["paired_diff_se"]
            verdict = ("within 0.5 points" if -0.005 <= lo and hi <= 0.005 else
                       "worse by more than 0.5 points" if hi < -0.005 else "not resolved at ±0.5 points")
            md.append(f"- {label}: 95% interval of Δ (Student t, {dof} dof) = [{100 * lo:+.2f}, {100 * hi:+.2f}] points: {verdict}.")
    return md


def t95(dof: int) -> float:
    """Two-sided 95% Student-t quantile (no scipy dependency); infinite for 0 degrees of freedom."""
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
             12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}
    if dof < 1:
        return float("inf")
    return table[max(d for d in table if d <= dof)] if dof <= 30 else 1.96


if __name__ == "__main__":
    main()
