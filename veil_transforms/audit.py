"""The privacy audit: run real attacks on veiled images and report how much of each original they recover.

    from veil_transforms import audit
    report = audit.run(originals, veiled)                           # cheap, keyless attacks
    report = audit.run(originals, veiled, model=third_party_model,  # + logit-matching inversion
                       learned=dict(public_images=xp, public_labels=yp,   # + adaptive U-Net
                                    veil_kwargs=dict(steps=300, lr=0.1), make_model=LeNet5))
    print(report.summary()); report.save("audit/")                  # report.md, report.json, worst.png
    ok = report.passed; per_sample = report.per_sample_max

``originals`` and ``veiled`` are matching batches ``[N, C, H, W]`` (uint8, or
float in [0, 1]; tensors or numpy arrays; ``[N, H, W]`` is taken as grey).

Each attack produces one or more *variants* (e.g. the fold and its inverse),
and each variant is compared, by SSIM (scikit-image's, data range 1, on [0, 1]
images), against one or more *references*: the original ``x`` always, and for
attacks that work in another domain also the original taken to that domain
(``fold(x)`` for fold attacks, ``sobel(x)`` for edges), because the attacker
wants anything recognizable. A sample's score for an attack is the maximum
over its variants and references; the audit fails if any attack's mean score
reaches ``thresholds[0]`` (default 0.15) or any sample's score reaches
``thresholds[1]`` (default 0.3; the paper's own bar for "same person,
different photo" is an SSIM of about 0.3).

Calibration: SSIM between *different* originals of one set is not zero (the
report gives it; about 0.2 for MNIST digits and for the LFW crops), and a
blank guess scores too (a black image gets about 0.26 against MNIST digits,
whose 7x7 windows are mostly black background; the report gives the best of
black, grey, white and the mean image). So an output that merely looks like a
generic digit, or nothing at all, can exceed the mean bar. The report therefore also gives, per attack, a top-1 re-identification
rate: one fixed variant's output for each of the first ``reid_gallery``
samples, matched by SSIM against all their originals (chance ``1/gallery``).
It is reported, not part of ``passed``.

Attacks (see :mod:`veil_transforms.attacks` for the functions):

- ``identity``: the veiled image, and its inverse ``255 - x~``;
- ``fold``: ``|2 x~ - 1|`` and its inverse (colour: per channel and channel-averaged);
- ``fold_denoise``: the fold after a 3x3 median, a Gaussian (sigma 1), TV and
  wavelet denoising (wavelet needs PyWavelets; skipped with a note otherwise),
  and a 2-98 percentile contrast stretch, each with its inverse;
- ``edges``: Sobel magnitude of the fold (and of its median) against that of
  ``x`` and of ``fold(x)``;
- ``sign_recovery``: signs chosen per pixel to make ``s * |x~|`` smooth, both global signs;
- ``learned`` (opt-in, ``learned=dict(...)``): a U-Net trained on public data
  veiled by the attacker with a surrogate model and own key;
- ``inversion`` (opt-in, ``model=``): images optimised to match a veiled-data
  model's outputs on the veiled images.

Several veils of one image (``veil-shard --copies K``) add one more attack,
which works on groups rather than samples: average an image's K veils
(:func:`average_copies`; a third party links them by position), then run every
attack above on the average. ``veil-audit`` and ``veil-export``'s gate do this
whenever the shards hold copies.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import attacks as A
from .functional import device_problem  # noqa: F401 - veil-audit asks it too

log = logging.getLogger(__name__)

CHEAP = ("identity", "fold", "fold_denoise", "edges", "sign_recovery")
EXPENSIVE = ("learned", "inversion")
ALL = CHEAP + EXPENSIVE
DEFAULT_THRESHOLDS = (0.15, 0.3)
# veil-export's default --max-attack-gain: a sample over the per-sample bar whose attacks recover no more
# than this share of what a flat image of it misses passes its gate (benchmarks/results/gate_calibration.md)
DEFAULT_MAX_GAIN = 0.1

# options accepted by run(**options), with defaults
OPTIONS = dict(
    chunk=1024,  # samples per chunk for the cheap attacks (bounds memory)
    sign_thresholds=(0.1, 0.2, 0.3),  # recover_signs(thresholds=)
    tv_weight=0.1,  # fold + TV denoising weight
    inversion_steps=150,
    inversion_lr=0.05,
    inversion_tv=0.05,
    device="cpu",
    worst=8,  # rows in worst.png
    reid_gallery=100,  # originals in the re-identification gallery (0: skip)
    progress=False,
)


def average_copies(veils) -> np.ndarray:
    """The averaging attack's image: the pixel-wise mean of one image's veils, rounded to uint8.

    ``veils`` is uint8 ``[K, N, C, H, W]`` (tensor or array): K veils of each of N
    images, as ``veil-shard --copies K`` stores them (sample i and sample
    i + N of a copy-major listing are veils of one image, which a third party
    can see). Independent keyed pads average out as K grows, and what they hid
    of x can show through; run :func:`run` on ``(originals, average_copies(veils))``.
    """
    v = veils.numpy() if isinstance(veils, torch.Tensor) else np.asarray(veils)
    if v.ndim != 5 or v.dtype != np.uint8 or len(v) < 1:
        raise ValueError(f"average_copies: expected uint8 [K, N, C, H, W] with K >= 1, got {v.dtype} {tuple(v.shape)}")
    return np.rint(v.astype(np.float32).mean(0)).astype(np.uint8)


# --------------------------------------------------------------------------- references
def _references(x01: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """Lazily computed references: the original in each attack's own domain."""
    cache: dict[str, np.ndarray] = {}

    def lazy(name, fn):
        def get():
            if name not in cache:
                cache[name] = fn()
            return cache[name]

        return get

    fold = lazy("fold", lambda: A.fold01(x01))
    fold_mean = lazy("fold_mean", lambda: np.repeat(fold().mean(1, keepdims=True), x01.shape[1], 1))
    return {
        "x": lambda: x01,
        "fold(x)": fold,
        "1-fold(x)": lazy("1-fold", lambda: 1 - fold()),
        "fold_mean(x)": fold_mean,
        "1-fold_mean(x)": lazy("1-fold_mean", lambda: 1 - fold_mean()),
        "sobel(x)": lazy("sobel", lambda: A.sobel(x01)),
        "sobel(fold(x))": lazy("sobel_fold", lambda: A.sobel(fold())),
    }


# --------------------------------------------------------------------------- attacks
# Each attack: (veiled [0, 1] float64 [n, C, H, W], context) -> list of (variant, images, references).
def _identity(v, ctx):
    return [("x~", v, ("x",)), ("1-x~", 1 - v, ("x",))]


def _fold(v, ctx):
    f = A.fold01(v)
    out = [("fold", f, ("fold(x)", "x")), ("1-fold", 1 - f, ("1-fold(x)", "x"))]
    if v.shape[1] > 1:
        fm = np.repeat(f.mean(1, keepdims=True), v.shape[1], 1)
        out += [("fold_mean", fm, ("fold_mean(x)", "x")), ("1-fold_mean", 1 - fm, ("1-fold_mean(x)", "x"))]
    return out


def _fold_denoise(v, ctx):
    f = A.fold01(v)
    filters = {
        "median3": A.median3,
        "gauss1": A.gaussian,
        "tv": lambda y: A.tv_denoise(y, ctx["tv_weight"]),
        "stretch": A.contrast_stretch,
    }
    if A.wavelet_available():
        filters["wavelet"] = A.wavelet_denoise
    else:
        ctx["notes"].add("fold_denoise: wavelet denoising skipped (PyWavelets is not installed)")
    out = []
    for name, fn in filters.items():
        d = np.clip(fn(f), 0, 1)
        out += [(f"fold+{name}", d, ("fold(x)", "x")), (f"1-(fold+{name})", 1 - d, ("1-fold(x)", "x"))]
    return out


def _edges(v, ctx):
    f = A.fold01(v)
    refs = ("sobel(x)", "sobel(fold(x))")
    return [("sobel(fold)", A.sobel(f), refs), ("sobel(median3(fold))", A.sobel(A.median3(f)), refs)]


def _sign_recovery(v, ctx):
    s = A.recover_signs(A.fold01(v), thresholds=tuple(ctx["sign_thresholds"]))
    return [("signs", (s + 1) / 2, ("x",)), ("-signs", (1 - s) / 2, ("x",))]


def _learned(v, ctx):
    out = A.apply_inverter(ctx["inverter"], torch.from_numpy(v).float(), device=ctx["device"]).double().numpy()
    return [("unet", out, ("x",))]


def _inversion(v, ctx):
    z = A.logit_inversion(
        ctx["model"], torch.from_numpy(v).float(), steps=ctx["inversion_steps"], lr=ctx["inversion_lr"],
        tv_weight=ctx["inversion_tv"], device=ctx["device"],
    ).double().numpy()
    return [("inversion", z, ("x",)), ("1-inversion", 1 - z, ("x",))]


ATTACKS: dict[str, Callable] = {
    "identity": _identity, "fold": _fold, "fold_denoise": _fold_denoise, "edges": _edges,
    "sign_recovery": _sign_recovery, "learned": _learned, "inversion": _inversion,
}


# --------------------------------------------------------------------------- report
@dataclass
class AuditReport:
    """What :func:`run` found. ``attacks[name]`` has ``mean_ssim``, ``max_ssim``,
    ``mean_psnr``, ``ssim`` (per-sample array), ``psnr`` (per-sample array),
    ``variants`` (mean SSIM per ``"<variant> vs <reference>"`` pair, e.g.
    ``"fold vs fold(x)"``, the number ../shared/FINDINGS.md reports), ``best_variant``
    (the pair that most often scored highest) and ``seconds``."""

    n: int
    shape: tuple[int, ...]
    thresholds: tuple[float, float]
    attacks: dict[str, dict[str, Any]]
    per_sample_max: np.ndarray
    per_sample_attack: list[str]
    reference_ssim: float
    blank_ssim: float = float("nan")
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    # per sample, the share of what a flat image leaves unexplained that the attacks recover against a
    # reference (flat_gain), the largest over the references: <= 0 means no attack showed more of it than
    # its brightness, 1 a perfect reconstruction
    per_sample_gain: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # uint8 [N, C, H, W] each

    @property
    def max_mean_ssim(self) -> float:
        """The highest per-attack mean score."""
        return max(a["mean_ssim"] for a in self.attacks.values())

    @property
    def max_ssim(self) -> float:
        """The highest score of any sample under any attack."""
        return float(self.per_sample_max.max())

    @property
    def passed(self) -> bool:
        """True if every attack's mean score is below ``thresholds[0]`` and every sample's below ``thresholds[1]``."""
        return self.max_mean_ssim < self.thresholds[0] and self.max_ssim < self.thresholds[1]

    @property
    def worst_attack(self) -> str:
        return max(self.attacks, key=lambda k: self.attacks[k]["mean_ssim"])

    def _verdict(self, a: dict) -> str:
        return "ok" if a["mean_ssim"] < self.thresholds[0] and a["max_ssim"] < self.thresholds[1] else "**LEAKS**"

    def summary(self) -> str:
        """A markdown report: verdict, one table row per attack, notes."""
        t_mean, t_max = self.thresholds
        lines = [
            f"**Privacy audit: {'PASSED' if self.passed else 'FAILED'}** "
            f"({self.n} samples of {'x'.join(map(str, self.shape))}; pass = every attack's mean SSIM < {t_mean:g} "
            f"and every sample's SSIM < {t_max:g})",
            "",
            "| attack | mean SSIM | max SSIM | mean PSNR (dB) | re-id top-1 | best variant | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, a in self.attacks.items():
            reid = f"{100 * a['reid_top1']:.0f}%" if a.get("reid_top1") is not None else "-"
            lines.append(
                f"| {name} | {a['mean_ssim']:.3f} | {a['max_ssim']:.3f} | {a['mean_psnr']:.1f} | {reid} | "
                f"{a['best_variant']} | {self._verdict(a)} |"
            )
        lines += [
            "",
            f"Worst attack: {self.worst_attack} (mean SSIM {self.max_mean_ssim:.3f}); worst sample SSIM {self.max_ssim:.3f}.",
            f"For scale: SSIM between different originals of this set (each against the next) is {self.reference_ssim:.3f} "
            f"on average, and the best blank guess (black, grey, white or the set's mean image, whichever scores "
            f"higher per sample) {self.blank_ssim:.3f}: a score near these reveals nothing specific.",
            "Scores are scikit-image SSIM on [0, 1] images; each sample's score is the max over an attack's "
            "variants and references (x, and x in the attack's domain, e.g. fold(x)).",
        ]
        if len(self.per_sample_gain):
            g, bar = np.asarray(self.per_sample_gain), DEFAULT_MAX_GAIN
            over = np.asarray(self.per_sample_max) >= t_max
            lines.append(
                f"Gain over a flat image (per sample and reference, how much of what the best black, grey, white or "
                f"own-mean-level image leaves unexplained the attacks recover, (SSIM - flat) / (1 - flat), the "
                f"largest; <= 0: nothing shown beyond brightness, 1: a perfect copy): "
                f"median {np.median(g):+.3f}, max {g.max():+.3f}; {int((g > bar).sum())} of {len(g)} samples above "
                f"+{bar:g}.")
            if over.any():
                lines.append(
                    f"Of the {int(over.sum())} samples at or over the per-sample bar {t_max:g}, {int((g[over] <= bar).sum())} "
                    f"show no more than a flat image does (gain <= +{bar:g}): veil-export's gate passes those "
                    "(--max-attack-gain); large or smooth images score high against a flat guess alone.")
        g = self.settings.get("reid_gallery_size")
        if g:
            d = self.settings.get("reid_gallery_distinct") or g
            chance = self.settings.get("reid_chance") or 1 / d
            of = f"{g}" if d == g else f"{g} ({d} distinct images: copies of one image count as one)"
            lines.append(
                f"Re-id top-1: how often an attack's output (its variant with the best mean, for every sample) is more "
                f"similar to its own original than to any other of a gallery of {of} (chance {100 * chance:.0f}%)."
            )
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def as_dict(self, per_sample: bool = True) -> dict:
        r = lambda v: None if not math.isfinite(v) else round(float(v), 5)  # noqa: E731
        attacks = {}
        for name, a in self.attacks.items():
            d = {k: (r(v) if isinstance(v, float) else v) for k, v in a.items() if k not in ("ssim", "psnr", "variants")}
            d["variants"] = {k: r(v) for k, v in a["variants"].items()}
            d["verdict"] = "ok" if self._verdict(a) == "ok" else "leaks"
            if per_sample:
                d["ssim"] = [r(v) for v in a["ssim"]]
                d["psnr"] = [r(v) for v in a["psnr"]]
            attacks[name] = d
        out = dict(
            passed=self.passed, n=self.n, shape=list(self.shape), thresholds=dict(mean=self.thresholds[0], max=self.thresholds[1]),
            max_mean_ssim=r(self.max_mean_ssim), max_ssim=r(self.max_ssim), worst_attack=self.worst_attack,
            reference_ssim=r(self.reference_ssim), blank_ssim=r(self.blank_ssim), attacks=attacks, notes=list(self.notes), settings=self.settings,
        )
        if per_sample:
            out["per_sample_max"] = [r(v) for v in self.per_sample_max]
            out["per_sample_gain"] = [r(v) for v in self.per_sample_gain]
            out["per_sample_attack"] = list(self.per_sample_attack)
        return out

    def to_json(self, per_sample: bool = True, indent: int | None = 1) -> str:
        return json.dumps(self.as_dict(per_sample), indent=indent, default=str)

    def worst_indices(self, k: int = 8) -> np.ndarray:
        return np.argsort(-self.per_sample_max, kind="stable")[:k]

    def worst_grid(self, k: int = 8):
        """A PIL image: for the ``k`` worst samples, the original, the veiled image and each attack's best output."""
        from PIL import Image, ImageDraw

        idx = self.worst_indices(k)
        cols = ["original", "veiled"] + list(self.attacks)
        imgs = [self._images["original"], self._images["veiled"]] + [self._images.get(a) for a in self.attacks]
        C, H, W = self.shape
        scale = max(1, math.ceil(64 / max(H, W)))
        cw, ch = max(W * scale, 84) + 4, H * scale + 16
        grid = Image.new("RGB", (cw * len(cols), 14 + ch * len(idx)), "white")
        d = ImageDraw.Draw(grid)
        for j, name in enumerate(cols):
            d.text((j * cw + 2, 1), name[:14], fill="black")
        for i, n in enumerate(idx):
            for j, (name, im) in enumerate(zip(cols, imgs)):
                if im is None:
                    continue
                a = im[n].transpose(1, 2, 0)
                tile = Image.fromarray(a[..., 0] if C == 1 else a).convert("RGB")
                tile = tile.resize((W * scale, H * scale), Image.NEAREST)
                x0, y0 = j * cw + 2, 14 + i * ch
                grid.paste(tile, (x0, y0))
                label = f"#{n}" if name == "original" else "" if name == "veiled" else f"{self.attacks[name]['ssim'][n]:.2f}"
                d.text((x0, y0 + H * scale + 2), label, fill="black")
        return grid

    def save(self, out_dir) -> Path:
        """Write ``report.md``, ``report.json`` and ``worst.png`` into ``out_dir`` (created); returns it."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"report.save: {out} is a file; it must be a folder (created if missing)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(self.summary())
        (out / "report.json").write_text(self.to_json())
        self.worst_grid(int(self.settings.get("worst", 8))).save(out / "worst.png")
        return out


# --------------------------------------------------------------------------- run
def as_images01(x, what: str) -> np.ndarray:
    """uint8 / [0, 1] float tensors or arrays ``[N, C, H, W]`` (or ``[N, H, W]``) -> float64 [0, 1] numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a batch [N, C, H, W], got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{what}: empty batch")
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{what}: expected uint8 or float pixels, got {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    if x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise ValueError(f"{what}: float pixels must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    return np.clip(x, 0, 1)


def _u8(y: np.ndarray) -> np.ndarray:
    return (np.clip(y, 0, 1) * 255).round().astype(np.uint8)


def _blank_ssim(x01: np.ndarray) -> float:
    """Mean over samples of the best SSIM an uninformed guess gets: black, grey, white or the mean image."""
    mean = x01.mean(0, keepdims=True)
    return float(_best_guess(x01, (np.zeros_like(mean), np.full_like(mean, 0.5), np.ones_like(mean), mean)).mean())


# the references the cheap attacks are scored against (see _references and each attack's list)
FLAT_REFERENCES = ("x", "fold(x)", "1-fold(x)", "fold_mean(x)", "1-fold_mean(x)", "sobel(x)", "sobel(fold(x))")


def flat_ssim(originals, references=FLAT_REFERENCES) -> np.ndarray:
    """Per sample, the best SSIM a flat image gets under the attacks' own scoring: black, mid-grey,
    white or a flat image of the reference's own mean level (per channel), against each of
    ``references`` (the original in each attack's domain), the maximum over them.

    The baseline for "says nothing": an attack output that scores no higher on a sample than this has
    shown nothing of it beyond its brightness. On small images it sits well below the gate's 0.3
    bar; on large or smooth ones it can reach 0.9 (the 7x7 windows of a smooth image are matched by
    its brightness alone), where an attack's denoised noise scores high for the same reason
    (``python benchmarks/gate_calibration.py``). Independent of the other samples in the batch."""
    x01 = as_images01(originals, "originals")
    refs = _references(x01)
    unknown = [r for r in references if r not in refs]
    if unknown:
        raise ValueError(f"flat_ssim: unknown reference(s) {unknown}; known: {list(refs)}")
    return np.max(np.stack([_flat(refs[name]()) for name in references]), 0)


FLAT_ROOM_MIN = 0.05  # flat_gain's smallest denominator: a near-flat reference does not blow it up


def flat_gain(score: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """How much of what a flat image leaves unexplained an attack recovers: ``(score - flat) / (1 -
    flat)`` (the denominator at least ``FLAT_ROOM_MIN``), clipped to [-1, 1]. 1: a perfect
    reconstruction; <= 0: no better than a flat image. Relative, because SSIM is a mean over windows:
    a small face on a large flat background gives a flat image 0.94 (128 px), so a perfect copy of it
    beats a flat image by 0.06 only, and a bar on that difference would pass it."""
    return np.clip((np.asarray(score) - flat) / np.maximum(1.0 - flat, FLAT_ROOM_MIN), -1.0, 1.0)


def _flat(ref: np.ndarray) -> np.ndarray:
    """Per sample, the best SSIM of a flat image against ``ref``: black, grey, white or its own mean level."""
    return _best_guess(ref, (0.0, 0.5, 1.0, ref.mean(axis=(2, 3), keepdims=True)))


def _best_guess(ref: np.ndarray, guesses) -> np.ndarray:
    """Per sample, the best SSIM against ``ref`` of any of ``guesses`` (each broadcast to ``ref``'s shape)."""
    best = np.full(len(ref), -np.inf)
    for g in guesses:
        best = np.maximum(best, A.ssim_batch(np.broadcast_to(g, ref.shape), ref))
    return best


def _reid(attack: str, pair: str, x01: np.ndarray, v01: np.ndarray, ctx: dict) -> float:
    """Top-1 re-identification rate of one fixed (variant, reference) pair over a gallery.

    The attack is rerun on the gallery's veiled images; output ``i`` is scored
    against the reference of every original ``j``; a hit is an ``argmax_j`` whose
    original is ``i``'s: the same image veiled twice (``veil-shard --copies``, or a
    duplicate in the data) sits in the gallery twice, and finding either is finding it.
    """
    vname, rname = pair.split(" vs ", 1)
    out = next(o for n, o, _ in ATTACKS[attack](v01, ctx) if n == vname)
    ref = _references(x01)[rname]()
    ident = _identities(x01)
    hits = 0
    for i in range(len(x01)):
        sc = A.ssim_batch(np.broadcast_to(out[i], ref.shape), ref)
        hits += int(ident[int(np.argmax(sc))] == ident[i])
    return hits / len(x01)


def _identities(x01: np.ndarray) -> np.ndarray:
    """An id per sample, equal for equal originals (copies of one image)."""
    seen: dict[bytes, int] = {}
    return np.array([seen.setdefault(a.tobytes(), len(seen)) for a in x01])


def check_options(thresholds=DEFAULT_THRESHOLDS, **options) -> tuple[tuple[float, float], dict[str, Any]]:
    """``(thresholds, options with defaults)`` as :func:`run` uses them; ValueError / TypeError for settings
    that are out of range or would switch a check off (a bar SSIM cannot reach, an inversion of 0 steps)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"run: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    opts = {**OPTIONS, **options}
    if isinstance(thresholds, dict):
        thresholds = (thresholds.get("mean", DEFAULT_THRESHOLDS[0]), thresholds.get("max", DEFAULT_THRESHOLDS[1]))
    try:
        thresholds = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise TypeError(f"thresholds: expected (mean, max) numbers or dict(mean=..., max=...), got {thresholds!r}") from None
    if len(thresholds) != 2:
        raise ValueError(f"thresholds: expected (mean, max), got {thresholds}")
    for name, t in zip(("mean", "max"), thresholds):
        if not -1 <= t < 1:  # also NaN
            why = ("SSIM is at most 1, so a bar of 1 or more passes everything" if t >= 1 else
                   "SSIM is at least -1, so a bar below -1 fails everything" if t < -1 else "not a number")
            raise ValueError(f"{name} threshold must lie in [-1, 1), got {t:g}: {why}")
    for name in ("chunk", "inversion_steps"):
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    why = device_problem(opts["device"])
    if why:
        raise ValueError(f"device {opts['device']!r}: {why}")
    if not float(opts["inversion_lr"]) > 0 or not math.isfinite(float(opts["inversion_lr"])):
        raise ValueError(f"inversion_lr must be a finite number > 0, got {opts['inversion_lr']!r}")
    return thresholds, opts


def run(
    originals,
    veiled,
    *,
    attacks=None,
    thresholds=DEFAULT_THRESHOLDS,
    learned: dict | None = None,
    model=None,
    **options,
) -> AuditReport:
    """Attack ``veiled`` and score each attack's output against ``originals``; see the module docstring.

    Args:
        originals, veiled: matching batches ``[N, C, H, W]``, uint8 or [0, 1] float.
        attacks: names to run (default: all cheap ones, plus ``learned`` and
            ``inversion`` when their inputs are given).
        thresholds: ``(mean, max)`` or ``dict(mean=..., max=...)`` SSIM bars, each in [-1, 1).
        learned: arguments of :func:`veil_transforms.attacks.learned_inverter`
            (``public_images``, ``public_labels``, ``veil_kwargs``, ``make_model``,
            optional ``epochs``, ``unet_epochs``, ``key``, ``seed``), or
            ``inverter=`` an already trained inverter.
        model: a model trained on veiled data (nn.Module, LocalModel or path),
            taking [-1, 1] input; enables ``inversion``.
        options: see ``OPTIONS`` (chunk, sign_thresholds, tv_weight,
            inversion_steps, inversion_lr, inversion_tv, device, worst,
            reid_gallery, progress).
    """
    thresholds, opts = check_options(thresholds, **options)
    x01 = as_images01(originals, "originals")
    v01 = as_images01(veiled, "veiled")
    if x01.shape != v01.shape:
        raise ValueError(f"originals {x01.shape} and veiled {v01.shape} differ in shape")
    if attacks is None:
        attacks = list(CHEAP) + (["learned"] if learned is not None else []) + (["inversion"] if model is not None else [])
    elif isinstance(attacks, str):
        attacks = [attacks]
    attacks = list(dict.fromkeys(attacks))
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; known: {list(ATTACKS)}")
    if not attacks:
        raise ValueError("run: no attacks selected")
    ctx: dict[str, Any] = {**opts, "notes": set()}
    seconds: dict[str, float] = {}
    if "learned" in attacks:
        if learned is None:
            raise ValueError("the 'learned' attack needs learned=dict(public_images=..., public_labels=..., veil_kwargs=..., make_model=...)")
        t0 = time.perf_counter()
        if "inverter" in learned:
            ctx["inverter"] = learned["inverter"]
        else:
            missing = {"public_images", "public_labels", "make_model"} - set(learned)
            if missing:
                raise ValueError(f"learned: missing {sorted(missing)}")
            kw = {k: v for k, v in learned.items() if k not in ("public_images", "public_labels")}
            kw.setdefault("device", opts["device"])
            _, info = A.learned_inverter(
                learned["public_images"], learned["public_labels"], torch.from_numpy(v01[:1]).float(),
                return_info=True, **kw,
            )
            ctx["inverter"] = info["inverter"]
            ctx["notes"].add(
                f"learned: U-Net trained on {len(learned['public_images'])} public images veiled by a surrogate "
                f"model under the attacker's own key ("
                + ", ".join(f"{k} {v:.0f} s" for k, v in info["seconds"].items() if k != "apply") + ")"
            )
        seconds["learned"] = time.perf_counter() - t0
    if "inversion" in attacks:
        if model is None:
            raise ValueError("the 'inversion' attack needs model= (a model trained on veiled data)")
        from .model import local_model_on

        ctx["model"] = local_model_on(model, opts["device"])
        ctx["model"].check_input(tuple(x01.shape[1:]))  # one-line ValueError for images it does not take

    N = len(x01)
    refs = _references(x01)
    scores = {a: np.full(N, -np.inf) for a in attacks}
    psnrs = {a: np.zeros(N) for a in attacks}
    best_names: dict[str, list] = {a: [None] * N for a in attacks}
    by_ref: dict[str, np.ndarray] = {}  # per reference, each sample's best score of any attack against it
    variant_scores: dict[str, dict[str, list]] = {a: {} for a in attacks}
    images = {"original": _u8(x01), "veiled": _u8(v01)}
    for a in attacks:
        images[a] = np.zeros(x01.shape, np.uint8)
    from .progress import bar

    chunk = int(opts["chunk"])
    with bar(total=len(attacks) * math.ceil(N / chunk), desc="audit", unit="step", disable=not opts["progress"]) as pb:
        for s in range(0, N, chunk):
            sl = slice(s, min(s + chunk, N))
            vc = v01[sl]
            for a in attacks:
                t0 = time.perf_counter()
                for vname, out, ref_names in ATTACKS[a](vc, ctx):
                    for rname in ref_names:
                        ref = refs[rname]()[sl]
                        sc = A.ssim_batch(out, ref)
                        variant_scores[a].setdefault(f"{vname} vs {rname}", []).append(sc)
                        r_best = by_ref.setdefault(rname, np.full(N, -np.inf))
                        r_best[sl] = np.fmax(r_best[sl], sc)  # NaN (a stretch of a flat output) is no score
                        better = sc > scores[a][sl]
                        if better.any():
                            idx = np.flatnonzero(better)
                            scores[a][sl][idx] = sc[idx]
                            psnrs[a][sl][idx] = A.psnr_batch(out[idx], ref[idx])
                            images[a][sl][idx] = _u8(out[idx])
                            for i in idx:
                                best_names[a][s + i] = f"{vname} vs {rname}"
                seconds[a] = seconds.get(a, 0.0) + time.perf_counter() - t0
                pb.update(1)

    results = {}
    for a in attacks:
        var = {k: float(np.concatenate(parts).mean()) for k, parts in variant_scores[a].items()}
        finite = psnrs[a][np.isfinite(psnrs[a])]
        results[a] = dict(
            mean_ssim=float(scores[a].mean()), max_ssim=float(scores[a].max()),
            mean_psnr=float(finite.mean()) if len(finite) else float("inf"),
            best_variant=Counter(best_names[a]).most_common(1)[0][0], variants=var,
            seconds=round(seconds.get(a, 0.0), 2), ssim=scores[a], psnr=psnrs[a],
        )
    G = min(int(opts["reid_gallery"]), N)
    counts = np.bincount(_identities(x01[:G])) if G > 1 else np.zeros(0, int)
    distinct = len(counts) if len(counts) > 1 else 0  # 0: no re-identification (one image or none)
    # a random guess finds image i's identity with probability m_i / G (m_i: its copies in the gallery)
    chance = float((counts.astype(float) ** 2).sum() / G**2) if distinct else None
    if distinct:
        for a in attacks:
            pair = max(results[a]["variants"], key=results[a]["variants"].get)
            results[a]["reid_top1"], results[a]["reid_variant"] = _reid(a, pair, x01[:G], v01[:G], ctx), pair
            results[a]["reid_chance"] = chance
    stacked = np.stack([scores[a] for a in attacks])
    per_max = stacked.max(0)
    per_attack = [attacks[i] for i in stacked.argmax(0)]
    reference = float(A.ssim_batch(x01, np.roll(x01, 1, axis=0)).mean()) if N > 1 else float("nan")
    blank = _blank_ssim(x01)
    # against each reference, the share of what a flat image leaves unexplained that the attacks' best
    # recovers; a sample's gain is the largest of these (a flat image's score against a trivial
    # reference, the flat fold of a checkerboard, must not excuse a reconstruction of x itself)
    gain = np.max(np.stack([flat_gain(best, _flat(refs[r]())) for r, best in by_ref.items()]), 0)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items() if k != "progress"}
    settings["attacks"] = attacks
    settings["reid_gallery_size"] = G if distinct else 0
    settings["reid_gallery_distinct"] = distinct
    settings["reid_chance"] = chance
    return AuditReport(
        n=N, shape=tuple(x01.shape[1:]), thresholds=thresholds, attacks=results, per_sample_max=per_max,
        per_sample_attack=per_attack, reference_ssim=reference, blank_ssim=blank, notes=sorted(ctx["notes"]), settings=settings,
        per_sample_gain=gain, _images=images,
    )
