"""Shared pieces of ``benchmarks/paper_tables.py``: sizes, data splits, the owner's veiled data (cached),
third-party architectures, metrics and result writing.

The veiled data of each (data set, split) is computed once with the library's ``VeilTransform`` (paper
mode, library defaults) and cached under ``benchmarks/.cache/`` so that Tables 3, 4 and 5 reuse what
Table 2 made. The cache key covers the sizes, the owner's training settings, the veil settings, the key,
the device type and the source of the library's veil code, so a change in any of them recomputes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import veil_transforms
from veil_transforms import functional as VF
from veil_transforms.attacks import fold01
from veil_transforms.data import load_lfw_faces, mnist_path, mnist_split
from veil_transforms.metrics import ssim
from veil_transforms.model import LocalModel
from veil_transforms.nets import LeNet5
from veil_transforms.training import accuracy, fit, predict
from veil_transforms.transform import VeilTransform

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"

# Sizes. REDUCED fits a 2-core shared CPU (each table < ~6 min); FULL is meant for a GPU.
REDUCED = dict(
    mnist_train=1000, mnist_test=500, mnist_seeds=[0, 1], mnist_epochs=15,
    lfw_splits=[0, 1, 2, 3, 4], lfw_epochs=40, ablation_lfw_splits=[0, 1, 2], ablation_mnist=False,
    transfer_archs=["alexnet_s", "alexnet_bn", "mlp"], transfer_seeds=1,
)
FULL = dict(
    mnist_train=8000, mnist_test=2000, mnist_seeds=[0, 1, 2], mnist_epochs=15,
    lfw_splits=list(range(10)), lfw_epochs=40, ablation_lfw_splits=list(range(5)), ablation_mnist=True,
    transfer_archs=["alexnet_s", "alexnet_bn", "mlp", "resnet18"], transfer_seeds=2,
)
LFW_TEST_FRAC = 0.3  # per class: 70 train / 30 test of the 100 faces and 100 non-faces
OWNER_SEED = 1000  # the owner's local model F is trained with seed OWNER_SEED + split


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def setup(device: str) -> None:
    """One torch thread on the CPU (the machine is shared), flush denormals (60x slowdowns otherwise)."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return "CPU (2 shared cores, 1 torch thread)"


# --------------------------------------------------------------------------- data
def mnist_data(n_train: int, n_test: int):
    """First n_train / last n_test of ../shared/data/mnist (the MNIST test set), or None if absent."""
    if mnist_path() is None:
        return None
    return mnist_split(n_train, n_test)


def lfw_split(split: int, test_frac: float = LFW_TEST_FRAC):
    """scikit-image's 200 LFW crops (face / not a face), a stratified random train/test split per ``split``."""
    x, y = load_lfw_faces()
    g = torch.Generator().manual_seed(10_000 + split)
    tr, te = [], []
    for c in (0, 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * test_frac))
        te.append(idx[:k])
        tr.append(idx[k:])
    tr, te = torch.cat(tr), torch.cat(te)
    return (x[tr], y[tr]), (x[te], y[te])


def key_for(dataset: str, split: int) -> bytes:
    return hashlib.sha256(f"paper_tables/{dataset}/{split}".encode()).digest()


# --------------------------------------------------------------------------- models
class SmallAlexNet(nn.Module):
    """AlexNet-style CNN (3 conv + ReLU + max-pool, 2 hidden FC layers with dropout), CPU-sized, any H, W >= 8.

    ``bn=True`` adds BatchNorm after each conv (not in AlexNet; a common modern variant).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, bn: bool = False):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), norm(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), norm(128), nn.ReLU(), nn.AdaptiveMaxPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(128 * 9, 256), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Two hidden layers (256, 128) on the flattened image."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.net(x)


def resnet18_1ch(num_classes: int) -> nn.Module:
    """torchvision ResNet-18 for small 1-channel images: 3x3 stride-1 stem, no max-pool (no pretrained weights)."""
    import torchvision

    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


ARCH_NAMES = {
    "lenet5": "LeNet-5",
    "alexnet_s": "AlexNet-style CNN (3 conv, 2 FC, dropout)",
    "alexnet_bn": "same + BatchNorm",
    "mlp": "MLP (256-128)",
    "resnet18": "ResNet-18 (1-ch, 3x3 stem)",
}
ARCH_LR = {"resnet18": 0.02}  # fit's default 0.05 otherwise
# Without BatchNorm the AlexNet-style CNN needs more steps to fit veiled data: at 15 epochs on 1,000 veiled
# MNIST images it stayed at ~21% training accuracy (an optimisation failure, not a transfer result).
ARCH_MIN_EPOCHS = {"alexnet_s": 40}


def make_model(arch: str, shape, num_classes: int, seed: int) -> nn.Module:
    """A fresh model; the global RNG is seeded first so weights (and dropout) are reproducible."""
    torch.manual_seed(seed)
    c, h, w = shape
    if arch == "lenet5":
        return LeNet5(c, num_classes)
    if arch in ("alexnet_s", "alexnet_bn"):
        return SmallAlexNet(c, num_classes, bn=arch == "alexnet_bn")
    if arch == "mlp":
        return MLP(c * h * w, num_classes)
    if arch == "resnet18":
        return resnet18_1ch(num_classes)
    raise ValueError(f"unknown arch {arch!r}")


def train(arch, x, y, num_classes, *, epochs, seed, device, **kw):
    m = make_model(arch, tuple(x.shape[1:]), num_classes, seed)
    kw.setdefault("lr", ARCH_LR.get(arch, 0.05))
    return fit(m, x, y, epochs=max(epochs, ARCH_MIN_EPOCHS.get(arch, 0)), seed=seed, device=device, **kw)


# --------------------------------------------------------------------------- veiling
@contextlib.contextmanager
def recording_steps():
    """Record the per-sample number of gradient-iteration steps taken inside ``VeilTransform`` calls.

    Temporarily wraps the library's paper-mode function so that it is called with ``return_stats=True``;
    the veil it computes is unchanged. Yields a list that fills with one tensor of steps per chunk.
    """
    rec: list[torch.Tensor] = []
    orig = VF.MODES["paper"]

    @functools.wraps(orig)
    def wrapped(*a, **kw):
        xt, st = orig(*a, return_stats=True, **kw)
        rec.append(st["steps"].detach().cpu())
        return xt

    VF.MODES["paper"] = wrapped
    try:
        yield rec
    finally:
        VF.MODES["paper"] = orig


def veil_library(veil: VeilTransform, x: torch.Tensor, batch: int = 4096):
    """Veil uint8 ``x`` with the library transform; returns (veiled uint8 on CPU, steps per sample)."""
    out, steps = [], []
    for s in range(0, len(x), batch):
        with recording_steps() as rec:
            out.append(veil.veil_batch(x[s : s + batch]).cpu())
        steps.append(torch.cat(rec) if rec else torch.full((len(out[-1]),), -1))
    return torch.cat(out), torch.cat(steps)


def veil_custom(model, x: torch.Tensor, *, start: str, key: bytes, p: float = 0.5, layer=None, device="cpu",
                gia: bool = True, seed: int = 0):
    """Ablation variants of Algorithm 1 built from ``veil_transforms.functional`` directly.

    start: ``"flip"`` (RPF with the keyed mask, as the library), ``"noise"`` (uniform noise in [-1, 1]
    instead of the flipped image) or ``"x"`` (no RPF: start from the original). ``gia=False`` skips the
    gradient iteration (RPF only). Paper settings otherwise (alpha, beta, T, xi, lr = DEFAULT_LR).
    Returns (veiled uint8 on CPU, steps per sample).
    """
    xn = VF.normalize(x).to(device)
    if start == "flip":
        x0 = VF.random_pixel_flip(xn, p, uniform=VF.keyed_uniforms(key, xn.cpu()).to(device))
    elif start == "noise":
        g = torch.Generator().manual_seed(seed)
        x0 = (torch.rand(xn.shape, generator=g) * 2 - 1).to(device)
    elif start == "x":
        x0 = xn.clone()
    else:
        raise ValueError(start)
    if not gia:
        return VF.denormalize(x0).cpu(), torch.zeros(len(x), dtype=torch.long)
    F = LocalModel(model, layer).to(device)
    xt, st = VF.gradient_iteration(F, x0, xn, lr=VF.DEFAULT_LR, return_stats=True)
    return VF.denormalize(xt).cpu(), st["steps"].cpu()


def _code_hash() -> str:
    pkg = Path(veil_transforms.__file__).parent
    h = hashlib.sha1()
    for f in ("functional.py", "model.py", "transform.py", "keys.py", "training.py", "nets.py"):
        p = pkg / f
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def owner_case(dataset: str, split: int, data, num_classes: int, *, epochs: int, device: str, veil_kwargs=None,
               tag: str = "main"):
    """The owner's side: train F (LeNet-5) on X, veil X_train and X_test with it (library, paper mode).

    Cached in benchmarks/.cache/. Returns dict(F, veiled_train, veiled_test, steps_train, steps_test,
    veil_seconds, fit_seconds, cached, settings).
    """
    (xtr, ytr), (xte, yte) = data
    veil_kwargs = dict(veil_kwargs or {})
    key = key_for(dataset, split)
    desc = dict(dataset=dataset, split=split, tag=tag, n_train=len(xtr), n_test=len(xte), num_classes=num_classes,
                epochs=epochs, owner_seed=OWNER_SEED + split, veil=veil_kwargs, key=key.hex(), device=str(device).split(":")[0],
                code=_code_hash(), torch=torch.__version__, default_lr=VF.DEFAULT_LR,
                data=hashlib.sha1(xtr.numpy().tobytes() + xte.numpy().tobytes() + ytr.numpy().tobytes()).hexdigest()[:12])
    h = hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{dataset}_{tag}_s{split}_{h}.pt"
    F = make_model("lenet5", tuple(xtr.shape[1:]), num_classes, OWNER_SEED + split)
    if path.is_file():
        c = torch.load(path, weights_only=False)
        F.load_state_dict(c["F"])
        F.to(device).eval()
        log(f"[{dataset}/{tag}/split {split}] cached veiled data ({path.name})")
        return dict(c, F=F, cached=True)
    t0 = time.perf_counter()
    F = fit(F, xtr, ytr, epochs=epochs, seed=OWNER_SEED + split, device=device)
    fit_s = time.perf_counter() - t0
    veil = VeilTransform(F, key=key, device=device, **veil_kwargs)
    t0 = time.perf_counter()
    vtr, str_ = veil_library(veil, xtr)
    vte, ste = veil_library(veil, xte)
    veil_s = time.perf_counter() - t0
    log(f"[{dataset}/{tag}/split {split}] veiled {len(xtr) + len(xte)} images in {veil_s:.0f} s "
        f"(mean steps {float(torch.cat([str_, ste]).float().mean()):.0f})")
    c = dict(F={k: v.detach().cpu() for k, v in F.state_dict().items()}, veiled_train=vtr, veiled_test=vte,
             steps_train=str_, steps_test=ste, veil_seconds=veil_s, fit_seconds=fit_s, settings=veil.settings, desc=desc)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(c, tmp)
    tmp.replace(path)
    return dict(c, F=F.eval(), cached=False)


# --------------------------------------------------------------------------- metrics
def ssim_x(x: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """Per-image SSIM(X, X~) (scikit-image, 7x7 window, data range 1), the paper's Table 3 metric."""
    return ssim(x, v)


def ssim_fold(x: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """Per-image SSIM(fold(X~), fold(X)) with fold(y) = |2y - 1| on [0, 1] images: the keyless fold attack."""
    return ssim(fold01(v.float() / 255.0), fold01(x.float() / 255.0))


def same_class_ssim(x: torch.Tensor, y: torch.Tensor, n: int = 500, seed: int = 0) -> float:
    """Mean SSIM between random pairs of *different* images of the same class (the paper's ~0.3 bar)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for i in torch.randperm(len(x), generator=g)[:n].tolist():
        same = torch.nonzero(y == y[i]).flatten()
        same = same[same != i]
        if len(same):
            a.append(i)
            b.append(int(same[torch.randint(len(same), (1,), generator=g)]))
    return float(ssim(x[a], x[b]).mean())


def acc(model, x, y, device) -> float:
    if len(x) == 0:
        return float("nan")
    return accuracy(model, x, y, device=device)


def ms(v) -> list[float]:
    """[mean, sd] (population sd; one value gives sd 0)."""
    v = [float(a) for a in v if not (isinstance(a, float) and math.isnan(a))]
    if not v:
        return [float("nan"), float("nan")]
    return [float(np.mean(v)), float(np.std(v))]


def pct(m, digits: int = 1) -> str:
    """[mean, sd] or a float in [0, 1] -> '97.3 ± 0.4%'."""
    if isinstance(m, (list, tuple)):
        if math.isnan(m[0]):
            return "n/a"
        return f"{100 * m[0]:.{digits}f} ± {100 * m[1]:.{digits}f}%"
    return "n/a" if m is None or math.isnan(m) else f"{100 * m:.{digits}f}%"


def num(m, digits: int = 3) -> str:
    if isinstance(m, (list, tuple)):
        return f"{m[0]:.{digits}f} ± {m[1]:.{digits}f}"
    return f"{m:.{digits}f}"


# --------------------------------------------------------------------------- output
def command_line(argv=None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python benchmarks/paper_tables.py " + shlex.join(args)


def write(name: str, lines: list[str], data: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    log(f"wrote benchmarks/results/{name}.md and .json")


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def header(title: str, cmd: str, cfg: dict, device: str, seconds: float, full: bool) -> list[str]:
    return [
        f"# {title}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Sizes: **{'full' if full else 'reduced'}** ({'--full' if full else 'default; `--full` gives the larger sizes'}). "
        f"Device: {device_name(device)}. Wall time {seconds / 60:.1f} min. torch {torch.__version__}. "
        f"Veil: library `VeilTransform`, mode `paper` (p 0.5, alpha 0.999, beta 0.001, T 300, xi 0.3), "
        f"lr {VF.DEFAULT_LR} (`functional.DEFAULT_LR`; the paper gives none), per-split secret key.",
        "",
    ]
