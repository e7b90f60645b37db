"""Small, deterministic training and evaluation helpers (for the demo, tests and benchmarks)."""

from __future__ import annotations

import torch
from torch import nn

from .functional import normalize


def seeded(make_model, seed: int) -> nn.Module:
    """``make_model()`` with its initial weights drawn under ``seed``; the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model()


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 15,
    lr: float = 0.05,
    batch_size: int = 64,
    momentum: float = 0.9,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment=None,
) -> nn.Module:
    """Train a classifier with SGD + cross-entropy on uint8 / [0, 1] images (normalized to [-1, 1]).

    ``seed`` fixes the order of the batches (and ``augment``'s draws); the
    initial weights are the model's own, so seed where it is built
    (``seeded(LeNet5, s)``) for a run that repeats.
    """
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    x, y = normalize(images).to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(x) + batch_size - 1) // batch_size))
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g).to(device)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            xb = x[idx] if augment is None else augment(x[idx], g)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def fit_many(
    models: list[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seeds: list[int],
    epochs: int = 15,
    lr: float = 0.05,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: str | torch.device = "cpu",
) -> list[nn.Module]:
    """Train M same-architecture models at once (``torch.func.vmap``): ``fit``'s recipe, M times, one pass.

    Model m trains on ``images[m]`` (uint8 or [0, 1], shape [M, N, C, H, W]; or one [N, C, H, W]
    set for all) with labels ``labels`` ([N], or [M, N]) and the batch order of ``fit(..., seed=seeds[m])``:
    the same SGD with momentum and weight decay, the same per-step cosine schedule, so each model ends
    where ``fit`` would take it, up to float rounding. For many small models on a GPU (the utility
    benchmarks' third-party LeNets) one vmapped step costs about what one model's step costs.
    The models are updated in place and returned in eval mode. Models with BatchNorm or Dropout are
    refused: their train-mode state is not vmapped here.
    """
    import copy
    import math

    from torch.func import functional_call, grad, stack_module_state, vmap

    if not models:
        raise ValueError("fit_many: no models")
    if len(seeds) != len(models):
        raise ValueError(f"fit_many: {len(models)} models but {len(seeds)} seeds")
    bad = [type(m).__name__ for net in models for m in net.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd))]
    if bad:
        raise ValueError(f"fit_many: models with {bad[0]} are not supported (train them one at a time with fit)")
    M = len(models)
    if images.ndim not in (4, 5):
        raise ValueError(f"fit_many: images must be [N, C, H, W] or [M, N, C, H, W], got shape {tuple(images.shape)}")
    imgs = images.to(device)
    shared_x = imgs.ndim == 4
    if not shared_x and imgs.shape[0] != M:
        raise ValueError(f"fit_many: images has {imgs.shape[0]} sets for {M} models")
    n = imgs.shape[-4]
    y = labels.to(device)
    if y.shape[-1] != n or (y.ndim == 2 and y.shape[0] != M):
        raise ValueError(f"fit_many: labels of shape {tuple(y.shape)} for {M} sets of {n} images")
    for m in models:
        m.to(device).train()
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, xb, yb):
        return nn.functional.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    step_grad = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    rows = torch.arange(M, device=device)[:, None]
    total = epochs * ((n + batch_size - 1) // batch_size)
    names = list(params)
    bufs: list[torch.Tensor] | None = None
    t = 0
    for _ in range(epochs):
        perm = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        for s in range(0, n, batch_size):
            idx = perm[:, s : s + batch_size]
            xb = normalize(imgs[idx] if shared_x else imgs[rows, idx])
            yb = y[idx] if y.ndim == 1 else y[rows, idx]
            g = step_grad(params, buffers, xb, yb)
            step_lr = lr * (1 + math.cos(math.pi * t / total)) / 2  # CosineAnnealingLR (eta_min 0) before its t-th step
            p_list = [params[k] for k in names]
            d_p = torch._foreach_add([g[k] for k in names], p_list, alpha=weight_decay)
            if bufs is None:  # torch.optim.SGD: the first momentum buffer is the first step's d_p
                bufs = [d.clone() for d in d_p]
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d_p)
            torch._foreach_add_(p_list, bufs if momentum else d_p, alpha=-step_lr)
            t += 1
    with torch.no_grad():
        for i, m in enumerate(models):
            for k, p in m.named_parameters():
                p.copy_(params[k][i])
    return [m.eval() for m in models]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024, device="cpu") -> torch.Tensor:
    model.eval()
    out = [model(normalize(images[s : s + batch_size]).to(device)).argmax(1).cpu() for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kw) -> float:
    return float((predict(model, images, **kw) == labels).float().mean())


def utility_experiment(
    make_model,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    veil_kwargs: dict | None = None,
    local_model: nn.Module | None = None,
    epochs: int = 15,
    seeds=(0,),
    veil_test: bool = True,
    device="cpu",
    batch_size: int = 2048,
) -> dict:
    """The paper's utility experiment, end to end, on one split.

    1. train the owner's local model F on X (or use ``local_model``);
    2. veil X (and the test set, for the "on X~" column) with F;
    3. train a fresh third-party model on (X~, Y) per seed, and a baseline on (X, Y) from the same
       initial weights (``seed`` fixes both the weights and the batch order; F uses 1234);
    4. report accuracy on original test images X and veiled test images X~,
       SSIM(X, X~), and how often F's argmax agrees on X~ and X.
    """
    import time

    import numpy as np

    from .metrics import ssim
    from .transform import VeilTransform

    (xtr, ytr), (xte, yte) = train, test
    F = local_model if local_model is not None else fit(seeded(make_model, 1234), xtr, ytr, epochs=epochs, seed=1234, device=device)
    veil = VeilTransform(F, device=device, **(veil_kwargs or {}))
    t0 = time.perf_counter()
    vtr = torch.cat([veil.veil_batch(xtr[s : s + batch_size]).cpu() for s in range(0, len(xtr), batch_size)])
    veil_s = time.perf_counter() - t0
    vte = torch.cat([veil.veil_batch(xte[s : s + batch_size]).cpu() for s in range(0, len(xte), batch_size)]) if veil_test else None
    agree = float((predict(F, vtr, device=device) == predict(F, xtr, device=device)).float().mean())
    base, on_x, on_xt = [], [], []
    for seed in seeds:
        base.append(accuracy(fit(seeded(make_model, seed), xtr, ytr, epochs=epochs, seed=seed, device=device), xte, yte, device=device))
        m = fit(seeded(make_model, seed), vtr, ytr, epochs=epochs, seed=seed, device=device)
        on_x.append(accuracy(m, xte, yte, device=device))
        if vte is not None:
            on_xt.append(accuracy(m, vte, yte, device=device))
    s = ssim(xtr, vtr)
    ms = lambda v: (float(np.mean(v)), float(np.std(v))) if v else (float("nan"), float("nan"))  # noqa: E731
    return {
        "baseline_acc": ms(base), "veiled_acc_on_X": ms(on_x), "veiled_acc_on_Xv": ms(on_xt),
        "ssim_mean": float(s.mean()), "ssim_max": float(s.max()), "agreement": agree,
        "veil_seconds": veil_s, "n_train": len(xtr), "n_test": len(xte), "seeds": list(seeds),
        "settings": veil.settings, "veiled_train": vtr, "local_model": F,
    }
