"""Pure tensor functions: the paper's Algorithm 1, batched over ``[B, C, H, W]``.

Convention: images enter as uint8 in [0, 255] or float in [0, 1]; the
algorithm works on values normalized to [-1, 1] (mean 0.5, std 0.5, as in the
paper). Every function is batched and treats each sample independently: a
sample's mask, loss, update and early stop are its own, so veiling a batch
equals veiling each sample alone (up to float rounding in batch-size-dependent
kernels).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from typing import Callable

import torch

from . import keys as _keys
from .model import frozen

# Chosen from benchmarks/lr_sweep.py on MNIST 8k/2k / LeNet-5 (benchmarks/results/lr_sweep.md,
# H200): 0.03, 0.1 and 0.3 all leave the veiled model 4.6-5.5 points below the baseline on
# originals, but below 0.1 F's argmax on X~ agrees with X only 81-92% of the time; 0.1 gives
# 97% agreement and SSIM(X, X~) 0.018, and stays well away from the collapse FINDINGS.md saw at 1.0.
DEFAULT_LR = 0.1

PAPER = dict(p=0.5, alpha=0.999, beta=0.001, steps=300, threshold=0.3)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [-1, 1]."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
    else:
        raise TypeError(f"normalize: expected uint8 or float pixels, got {x.dtype}")
    return (x - 0.5) / 0.5


def denormalize(x: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255] (rounded) or float [0, 1]; values outside are clamped."""
    y = (x * 0.5 + 0.5).clamp(0.0, 1.0)
    if dtype == torch.uint8:
        return (y * 255.0).round().to(torch.uint8)
    return y.to(dtype)


def check_pixels(x: torch.Tensor, what: str = "input") -> None:
    """Raise a clear error for pixels the veil cannot take (wrong dtype, NaN/inf, out of range)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected uint8 or float pixels, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{what}: float pixels must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
            "(pass uint8 for [0, 255] images)"
        )


def random_pixel_flip(
    x: torch.Tensor,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    *,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply each value by -1 with probability ``p`` (Eq. 1 of the paper).

    The mask is ``-1 where u < p else 1`` with ``u ~ U(0, 1)`` drawn from
    ``generator``, or taken from ``uniform`` (same shape as ``x``) when the
    caller derives it from a key (see :func:`keyed_uniforms`).
    """
    check_p(p)
    if uniform is None:
        uniform = torch.rand(x.shape, generator=generator, device=generator.device if generator else "cpu")
    if uniform.shape != x.shape:
        raise ValueError(f"uniform has shape {tuple(uniform.shape)}, x has {tuple(x.shape)}")
    mask = torch.where(uniform.to(x.device) < p, -1.0, 1.0).to(x.dtype)
    return x * mask


def check_p(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 < float(p) < 1.0):
        raise ValueError(f"p must lie in the open interval (0, 1), got {p!r}")


def keyed_uniforms(key: bytes, x_norm: torch.Tensor) -> torch.Tensor:
    """Per-sample uniforms for a batch ``[B, C, H, W]`` of normalized images, from the key."""
    shape = tuple(x_norm.shape[1:])
    cpu = x_norm.detach().to("cpu")
    return torch.stack([_keys.keyed_uniform(key, _keys.sample_digest(key, s), shape) for s in cpu])


def paper_loss(f, target, x_tilde, x, alpha, beta):
    """Per-sample L = alpha * ||F(x~) - F(x)||_1 - beta * ||x~ - x||_2 (Eq. 2).

    With ``beta == 0`` the distance term is left out entirely, so the pixels of
    ``x`` do not enter the gradient (the hardened mode relies on this).
    """
    l1 = alpha * (f - target).abs().flatten(1).sum(1)
    if beta == 0:
        return l1
    return l1 - beta * (x_tilde - x).flatten(1).norm(dim=1)


def gradient_iteration(
    model: Callable[[torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    x: torch.Tensor,
    *,
    alpha: float = PAPER["alpha"],
    beta: float = PAPER["beta"],
    lr: float = DEFAULT_LR,
    steps: int = PAPER["steps"],
    threshold: float = PAPER["threshold"],
    return_stats: bool = False,
    precision: str = "fp32",
    cuda_graph: bool = False,
):
    """SGD on x~ for ``steps`` steps of Eq. (3), each sample stopping on its own.

    ``x_start`` is the flipped image and ``x`` the original, both normalized and
    ``[B, ...]``. As in Algorithm 1, a sample whose loss (before its update) is
    below ``threshold`` takes that update and then stops. Samples that stopped
    are dropped from the batch, so converged samples cost nothing.

    Fast options (opt-in; see benchmarks/throughput.py):

    * ``precision="bf16"``: F's forward (and so its backward) runs under
      ``torch.autocast`` in bfloat16. x~, F's outputs as used in the loss, the
      loss and the update stay float32. Same veil up to bf16 rounding of the
      gradient (tests/test_fastpath.py).
    * ``cuda_graph=True``: one step on the whole batch is captured as a CUDA
      graph and replayed; stopped samples are masked instead of dropped. Once
      half the batch has stopped, the loop goes on eagerly with compaction.
      Needs static shapes and a model that never syncs with the host; if the
      capture fails it warns and goes on eagerly. On other devices the same
      masked loop runs eagerly (no speed-up; it exists to be tested).

    Returns x~ (unclamped, normalized), and with ``return_stats`` also a dict
    with per-sample ``steps`` taken and last ``loss``.
    """
    check_steps(steps)
    check_precision(precision)
    if x_start.shape != x.shape:
        raise ValueError(f"x_start {tuple(x_start.shape)} and x {tuple(x.shape)} differ in shape")

    def loss_grad(xa, xo, tg):
        with _autocast(xa.device.type, precision):
            f = model(xa)
        loss = paper_loss(f.float(), tg, xa, xo, alpha, beta)
        (grad,) = torch.autograd.grad(loss.sum(), xa)
        return loss, grad

    with torch.enable_grad(), frozen(model):
        with torch.no_grad(), _autocast(x.device.type, precision):
            target = model(x).float()
        xt = x_start.detach().clone()
        n = xt.shape[0]
        active = torch.arange(n, device=xt.device)
        taken = torch.zeros(n, dtype=torch.long, device=xt.device)
        last = torch.full((n,), math.nan, device=xt.device)
        done = 0
        if cuda_graph:
            done, active = _masked_steps(loss_grad, xt, x, target, taken, last, lr, threshold, steps)
        for _ in range(steps - done):
            if active.numel() == 0:
                break
            full = active.numel() == n
            xa = (xt if full else xt[active]).detach().requires_grad_(True)
            xo, tg = (x, target) if full else (x[active], target[active])
            loss, grad = loss_grad(xa, xo, tg)
            with torch.no_grad():
                xt[active] = xa - lr * grad
                taken[active] += 1
                last[active] = loss
                active = active[loss >= threshold]
    xt = xt.detach()
    if return_stats:
        return xt, {"steps": taken, "loss": last}
    return xt


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _autocast(device_type: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    # no weight-cast cache: it must not outlive a CUDA-graph capture (and frozen weights are not cached anyway)
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)


def _masked_steps(loss_grad, xt, x, target, taken, last, lr, threshold, steps, warmup=3, block=10):
    """The first steps of gradient_iteration on the whole batch, stopped samples masked (not dropped).

    On CUDA: ``warmup`` eager steps on a side stream, then one step captured as
    a CUDA graph and replayed. Every ``block`` steps the host checks how many
    samples are still active and hands over to the eager, compacting loop once
    half have stopped. Updates ``xt``, ``taken``, ``last`` in place; returns
    (steps done, indices of the samples still active).
    """
    n = xt.shape[0]
    on = torch.ones(n, dtype=torch.bool, device=xt.device)
    shape = (n,) + (1,) * (xt.ndim - 1)

    def step():
        xa = xt.detach().requires_grad_(True)
        loss, grad = loss_grad(xa, x, target)
        with torch.no_grad():
            xt.copy_(torch.where(on.view(shape), xa - lr * grad, xa))
            taken.add_(on)
            last.copy_(torch.where(on, loss, last))
            on.logical_and_(loss >= threshold)

    run, done = step, 0
    if xt.is_cuda and steps > warmup + 1:
        side = torch.cuda.Stream(xt.device)
        side.wait_stream(torch.cuda.current_stream(xt.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(xt.device).wait_stream(side)
        done = warmup
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(xt.device), torch.cuda.graph(graph):
                step()
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - any capture failure: go on eagerly
            warnings.warn(f"cuda_graph: capture failed ({type(e).__name__}: {e}); continuing eagerly", stacklevel=3)
            return done, on.nonzero().squeeze(1)
    while done < steps:
        for _ in range(min(block, steps - done)):
            run()
        done = min(done + block, steps)
        if int(on.sum()) <= n // 2:
            break
    return done, on.nonzero().squeeze(1)


def auto_batch_size(
    model: Callable[[torch.Tensor], torch.Tensor],
    sample_shape,
    device: torch.device | str,
    *,
    precision: str = "fp32",
    limit: int = 1 << 16,
    cpu_default: int = 512,
) -> int:
    """The largest power-of-two batch (<= ``limit``) for which one veil step fits in memory.

    On CUDA: a step on 8 samples gives the memory per sample, the first guess
    is the power of two that fills 80% of free memory, and the guess is halved
    on out-of-memory errors. On other devices returns ``cpu_default`` (on the
    CPU cache-sized batches are fastest, see :func:`veil`).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_default
    sample_shape = tuple(int(s) for s in sample_shape)

    def try_batch(b):
        z = torch.zeros((b, *sample_shape), device=device)
        if z.ndim == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        gradient_iteration(model, z, z, steps=1, threshold=-math.inf, precision=precision)

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try_batch(8)
    per_sample = max(1, (torch.cuda.max_memory_allocated(device) - base) // 8)
    free, _ = torch.cuda.mem_get_info(device)
    b = 1 << int(math.log2(max(1, min(limit, 0.8 * free // per_sample))))
    while b > 1:
        try:
            try_batch(b)
            return b
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or cuDNN failing to get a workspace
            if "out of memory" not in str(e).lower():
                raise
        torch.cuda.empty_cache()  # outside the except block, so the traceback's tensors are gone
        b //= 2
    return 1


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def veil(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    key: bytes | None = None,
    generator: torch.Generator | None = None,
    p: float = PAPER["p"],
    alpha: float = PAPER["alpha"],
    beta: float = PAPER["beta"],
    lr: float = DEFAULT_LR,
    steps: int = PAPER["steps"],
    threshold: float = PAPER["threshold"],
    output: str = "uint8",
    mode: str = "paper",
    device: torch.device | str | None = None,
    chunk: int | str | None = None,
    precision: str = "fp32",
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Veil a batch ``[B, C, H, W]`` of uint8 or [0, 1] float images (Algorithm 1).

    The flip mask comes from ``key`` (per-sample, derived from the key and the
    image, see :mod:`veil_transforms.keys`) or, for experiments, ``generator``.
    Returns uint8 images for uint8 input; float input gives float in [0, 1],
    snapped to the 256-level grid when ``output == "uint8"``.

    The loop runs on ``device`` in channels-last layout, in sub-batches of
    ``chunk`` samples (default: the whole batch on a GPU, 512 on the CPU, where
    cache-sized batches run about 1.5x faster; ``"auto"``: :func:`auto_batch_size`).
    Samples are independent, so chunking does not change the result beyond
    float rounding.

    Speed options (see :func:`gradient_iteration`): ``precision="bf16"`` runs
    F under bf16 autocast, ``cuda_graph=True`` replays the step as a CUDA graph
    on CUDA devices (ignored elsewhere). Defaults give the exact fp32 loop.
    """
    if images.ndim != 4:
        raise ValueError(f"veil expects a batch [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("veil: empty batch")
    check_pixels(images, "images")
    check_p(p)
    check_steps(steps)
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    check_precision(precision)
    if (key is None) == (generator is None):
        raise ValueError("veil: pass exactly one of key= (secret bytes) or generator=")
    in_dtype = images.dtype
    device = torch.device(device) if device is not None else images.device
    xn = normalize(images)
    u = keyed_uniforms(key, xn) if key is not None else None
    xn = xn.to(device).contiguous(memory_format=torch.channels_last)
    x0 = random_pixel_flip(xn, p, generator, uniform=None if u is None else u.to(device))
    if chunk is None:
        chunk = len(xn) if device.type == "cuda" else 512
    elif chunk == "auto":
        chunk = auto_batch_size(model, xn.shape[1:], device, precision=precision)
    gia = MODES[mode]
    fast = {}  # only non-default speed options, so modes without them keep working
    if precision != "fp32":
        fast["precision"] = precision
    if cuda_graph and device.type == "cuda":
        fast["cuda_graph"] = True
    unsupported = [k for k in fast if k not in inspect.signature(gia).parameters]
    if unsupported:
        raise ValueError(f"mode {mode!r} does not support {', '.join(unsupported)}")
    xt = torch.cat([
        gia(model, x0[s : s + chunk], xn[s : s + chunk], alpha=alpha, beta=beta, lr=lr, steps=steps, threshold=threshold, **fast)
        for s in range(0, len(xn), chunk)
    ])
    if in_dtype == torch.uint8:
        return denormalize(xt, torch.uint8).to(images.device)
    out = denormalize(xt, torch.uint8).float() / 255.0 if output == "uint8" else denormalize(xt, torch.float32)
    return out.to(device=images.device, dtype=in_dtype)


# mode name -> gradient-iteration function with gradient_iteration's signature.
MODES: dict[str, Callable] = {"paper": gradient_iteration}

from . import hardened as _hardened  # noqa: E402,F401 - registers mode "hardened"
