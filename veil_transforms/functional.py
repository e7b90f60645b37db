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
import functools
import inspect
import math
import numbers
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from . import keys as _keys
from .allocator import tune_for_cpu_veil
from .model import LocalModel, check_model, frozen, modes_of, restore_modes, takes_channels_last

# Chosen from benchmarks/lr_sweep.py on MNIST 8k/2k / LeNet-5 (benchmarks/results/lr_sweep.md,
# H200): 0.03, 0.1 and 0.3 all leave the veiled model 4.6-5.5 points below the baseline on
# originals, but below 0.1 F's argmax on X~ agrees with X only 81-92% of the time; 0.1 gives
# 97% agreement and SSIM(X, X~) 0.018, and stays well away from the collapse ../shared/FINDINGS.md saw at 1.0.
DEFAULT_LR = 0.1

PAPER = dict(p=0.5, alpha=0.999, beta=0.001, steps=300, threshold=0.3)


def _int_hint(x) -> str:
    """How to pass integer pixels of another dtype (a tensor or an array): 0..255 (int64 from torch.randint,
    np.array of ints) as uint8; deeper ones (16-bit scans) scaled to float, since a cast to uint8 wraps
    them and PIL's convert('L') clips them at 255."""
    if x.dtype == torch.bool or (not isinstance(x, torch.Tensor) and x.dtype == bool):
        return " (a mask? images are uint8 or float)"
    if x.dtype.is_complex if isinstance(x, torch.Tensor) else x.dtype.kind == "c":
        return ""
    try:  # the values decide, not the dtype (int16 is a common cast of 8-bit pixels); torch has no min() /
        # max() for uint16 and uint32 on the CPU, numpy has them all
        a = (x.detach().cpu().to(torch.int64) if x.dtype != torch.uint64 else x.detach().cpu()).numpy() \
            if isinstance(x, torch.Tensor) else x
        low, high = (int(a.min()), int(a.max())) if a.size else (0, 0)
    except (RuntimeError, TypeError, ValueError):
        low, high = 0, 1 << 16
    if low < 0:
        return " (negative values: images are uint8 in 0..255 or float in [0, 1])"
    if high <= 255:
        return " (values 0..255: convert them with .to(torch.uint8) or .astype(np.uint8))"
    return " (16- or 32-bit images: scale them to float in [0, 1], e.g. x.float() / 65535 for 16 bits)"


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [-1, 1]."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
    else:
        raise TypeError(f"normalize: expected uint8 or float pixels, got {x.dtype}{_int_hint(x)}")
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
        raise TypeError(f"{what}: expected uint8 or float pixels, got {x.dtype}{_int_hint(x)}")
    x = x.detach()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{what}: float pixels must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
            "(pass uint8 for [0, 255] images; after Normalize they are not pixels: put the veil before "
            "Normalize, and after ToDtype(torch.float32, scale=True) if any)"
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
    if not (_is_number(p) and 0.0 < float(p) < 1.0):
        raise ValueError(f"p must lie in the open interval (0, 1), got {p!r}")


def keyed_uniforms(key: bytes, x_norm: torch.Tensor) -> torch.Tensor:
    """Per-sample uniforms for a batch ``[B, C, H, W]`` of normalized images, from the key.

    Equal to stacking :func:`keys.keyed_uniform` of each sample's
    :func:`keys.sample_digest` (one hash pair per sample; the conversion to
    floats is done once for the whole batch).
    """
    return _keys.keyed_uniforms_batch(key, x_norm)


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
    compile: bool = False,
):
    """SGD on x~ for ``steps`` steps of Eq. (3), each sample stopping on its own.

    ``x_start`` is the flipped image and ``x`` the original, both normalized and
    ``[B, ...]``. As in Algorithm 1, a sample whose loss (before its update) is
    below ``threshold`` takes that update and then stops.

    The loop never waits for the device inside a step: a stopped sample is
    masked (its update is a no-op), and the host looks at how many samples are
    still active only every step on the CPU and every ``CHECK_EVERY`` steps on
    a GPU. When some have stopped, the batch is compacted to the active ones
    (with ``cuda_graph``: once half have stopped, since each compaction
    re-captures the graph), so converged samples stop costing time.

    Speed options (see README "Speed" and benchmarks/throughput.py):

    * ``precision="bf16"``: F's forward (and so its backward) runs under
      ``torch.autocast`` in bfloat16. x~, F's outputs as used in the loss, the
      loss and the update stay float32. Same veil up to bf16 rounding of the
      gradient (tests/test_fastpath.py).
    * ``cuda_graph=True``: blocks of ``CHECK_EVERY`` steps are captured as one
      CUDA graph and replayed (:func:`veil` turns this on for CUDA by
      default). Needs a model that never syncs with the host; if the capture
      fails it warns once per model and goes on eagerly. Ignored off CUDA.
    * ``compile=True``: F's forward with the loss goes through
      ``torch.compile`` (inductor fuses the elementwise work around the
      convolutions, forward and backward). Costs a compilation of tens of
      seconds the first time per model and input shape; pays for long runs.

    Returns x~ (unclamped, normalized), and with ``return_stats`` also a dict
    with per-sample ``steps`` taken and last ``loss``.
    """
    check_steps(steps)
    check_precision(precision)
    _warn_if_emulated_bf16(precision, x.device)
    if x_start.shape != x.shape:
        raise ValueError(f"x_start {tuple(x_start.shape)} and x {tuple(x.shape)} differ in shape")
    # compiled: the whole batch with static shapes (the fastest kernels; one compilation per batch
    # size), compacted batches (a new size each time) with dynamic ones (one compilation for all)
    loss_full = _loss_fn(model, alpha, beta, precision, compile, dynamic=COMPILE_FULL_DYNAMIC)
    loss_part = _loss_fn(model, alpha, beta, precision, compile, dynamic=True)
    graph = bool(cuda_graph) and x.is_cuda and not _failed_before(_NO_GRAPH, model)
    ckey = _graph_key(model, x, lr, threshold, alpha, beta, precision, compile) if graph else None
    with torch.enable_grad(), frozen(model), _cudnn_benchmark(x.is_cuda):
        with torch.no_grad(), _autocast(x.device.type, precision):
            target = model(x).float()
        xt = x_start.detach().clone()
        n = xt.shape[0]
        taken = torch.zeros(n, dtype=torch.long, device=xt.device)
        last = torch.full((n,), math.nan, device=xt.device)
        idx, done = None, 0  # idx: the samples still active (None: all of them)
        while done < steps:
            # a graph captured by an earlier call, on its own copies of the inputs (locked for this call)
            kept = _kept_graph(model, ckey) if idx is None and ckey is not None else None
            try:
                if kept is not None:
                    part, on0 = kept.load(xt, x, target)
                elif idx is None and ckey is not None:  # captured on copies the graph owns, so a later call can replay it
                    part, on0 = tuple(t.clone() for t in (xt, x, target, taken, last)), None
                elif idx is None:
                    part, on0 = (xt, x, target, taken, last), None
                else:
                    part, on0 = tuple(t[idx] for t in (xt, x, target, taken, last)), None
                ran, on, graph_ok, g = _phase(loss_full if idx is None else loss_part, *part, lr=lr, threshold=threshold, steps=steps - done,
                                              graph=graph, on=on0, g=kept.graph if kept is not None else None)
                if idx is None and ckey is not None:  # results out of the graph's buffers (the next call reuses them)
                    xt, taken, last, on_out = part[0].clone(), part[3].clone(), part[4].clone(), on.clone()
                    if kept is None and g is not None:
                        kept = _keep_graph(model, ckey, g, part, on)
                    on = on_out
            finally:
                if kept is not None:
                    kept.release()
            if graph and not graph_ok:  # the model cannot be captured: eager from now on, no more warnings
                graph = False
                _failed_before(_NO_GRAPH, model, record=True)
            if idx is not None:
                xt[idx], taken[idx], last[idx] = part[0], part[3], part[4]
            done += ran
            keep = on.nonzero().squeeze(1)
            idx = keep if idx is None else idx[keep]
            if idx.numel() == 0:
                break
    xt = xt.detach()
    if return_stats:
        return xt, {"steps": taken, "loss": last}
    return xt


# the host reads the number of active samples every this many steps: on a GPU (a read is a
# sync), and on the CPU (free there, so every step: stopped samples are dropped at once)
CHECK_EVERY = 10
CHECK_EVERY_CPU = 1
# eager steps (on a side stream) before a graph is captured: so a call of fewer than
# WARMUP_STEPS + CHECK_EVERY steps captures nothing
WARMUP_STEPS = 3


# Set (per thread) by warming_up(): the first phase captures its graph even when most samples stopped
# in the eager steps before the capture (a dummy batch of noise stops sooner than real images).
_WARMING = threading.local()


@contextlib.contextmanager
def warming_up():
    """Within: a call's first graph is captured (and kept) whatever its samples' losses do, for
    :meth:`VeilTransform.warm_up`, whose dummy batch must leave the graph a real batch replays."""
    _WARMING.on = True
    try:
        yield
    finally:
        _WARMING.on = False


def _phase(loss_fn, xt, x, target, taken, last, *, lr, threshold, steps, graph, warmup=WARMUP_STEPS, on=None, g=None):
    """Masked steps on one batch until ``steps`` are done or it is worth compacting.

    Updates ``xt``, ``taken``, ``last`` in place; returns (steps run, mask of
    the samples still active, False if a graph capture failed, the captured
    graph or None). ``g``: a graph an earlier call captured on these very
    tensors (and ``on``), replayed from the first step. Eager on the
    CPU: checks after every step and returns as soon as one sample stopped.
    On CUDA: checks every ``CHECK_EVERY`` steps. With ``graph``: ``warmup``
    eager steps on a side stream, then ``CHECK_EVERY`` steps captured as one
    CUDA graph; each replay is queued before the host reads the previous
    replay's count of active samples, so the GPU has work queued while the
    host checks; returns once half the batch has stopped (the block queued
    after that decision runs too: its stopped samples are masked, so harmless).
    """
    n = xt.shape[0]
    if on is None:
        on = torch.ones(n, dtype=torch.bool, device=xt.device)
    shape = (n,) + (1,) * (xt.ndim - 1)

    def step():
        xa = xt.detach().requires_grad_(True)
        loss = loss_fn(xa, x, target)
        (grad,) = torch.autograd.grad(loss.sum(), xa)
        with torch.no_grad():
            loss = loss.detach()
            xt.copy_(torch.where(on.view(shape), xa - lr * grad, xa))
            taken.add_(on)
            last.copy_(torch.where(on, loss, last))
            on.logical_and_(loss >= threshold)

    every, enough = (CHECK_EVERY, n // 2 if graph else n - 1) if xt.is_cuda else (CHECK_EVERY_CPU, n - 1)
    done, captured = 0, True
    if g is not None:
        done, stop = _replay(g, on, done, steps, every, enough)
        if stop:
            return done, on, True, g
    elif graph and steps >= warmup + every:
        side = torch.cuda.Stream(xt.device)
        side.wait_stream(torch.cuda.current_stream(xt.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(xt.device).wait_stream(side)
        done = warmup
        if int(on.sum()) <= enough and not getattr(_WARMING, "on", False):
            return done, on, True, None
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(xt.device), torch.cuda.graph(g):
                for _ in range(every):
                    step()
        except Exception as e:  # noqa: BLE001 - any capture failure: go on eagerly
            warnings.warn(f"cuda_graph: capture failed ({type(e).__name__}: {e}); continuing eagerly", stacklevel=4)
            torch.cuda.synchronize(xt.device)
            enough, captured, g = n - 1, False, None
        else:
            done, stop = _replay(g, on, done, steps, every, enough)
            if stop:
                return done, on, True, g
    while done < steps:
        for _ in range(min(every, steps - done)):
            step()
        done = min(done + every, steps)
        if int(on.sum()) <= enough:
            break
    return done, on, captured, g


def _replay(g, on, done, steps, every, enough):
    """Replay ``g`` (``every`` steps) while whole blocks fit; the host reads each block's active
    count only after queueing the next block. Returns (steps done, whether to stop the phase)."""
    counts = torch.empty(2, dtype=torch.long, pin_memory=True)
    events = [torch.cuda.Event(), torch.cuda.Event()]
    i, pending = 0, None
    while steps - done >= every:
        g.replay()
        done += every
        counts[i].copy_(on.sum(), non_blocking=True)
        events[i].record()
        if pending is not None:
            events[pending].synchronize()
            if int(counts[pending]) <= enough:
                return done, True
        pending, i = i, 1 - i
    if pending is not None:
        events[pending].synchronize()
        if int(counts[pending]) <= enough:
            return done, True
    return done, False


class _Kept:
    """A captured block of steps with the tensors it reads and writes (see :func:`_kept_graph`)."""

    def __init__(self, graph, bufs):
        self.graph, self.bufs, self.lock, self.free = graph, bufs, threading.Lock(), None

    def load(self, x_start, x, target):
        """Copy a new batch into the graph's tensors; returns them (xt, x, target, taken, last) and ``on``."""
        xt, xo, tg, taken, last, on = self.bufs
        if self.free is not None:  # the last user's copies out, perhaps queued on another stream
            torch.cuda.current_stream(xt.device).wait_event(self.free)
        xt.copy_(x_start)
        xo.copy_(x)
        tg.copy_(target)
        taken.zero_()
        last.fill_(math.nan)
        on.fill_(True)
        return (xt, xo, tg, taken, last), on

    def release(self):
        self.free = torch.cuda.Event()
        self.free.record(torch.cuda.current_stream(self.bufs[0].device))
        self.lock.release()


# Graphs kept between calls, per model: a call with the same model (same weight tensors), batch
# shape and settings replays the graph an earlier call captured, with no warm-up and no capture
# (both cost eager, Python-driven steps: tens of milliseconds a call, more when other threads hold
# the GIL, as in veil-shard). Kept for the first phase of a call only (the whole batch; compacted
# batches vary in size) and for GRAPH_CACHE_SIZE shapes per model; freed with the model or by
# clear_graph_cache(). Each holds its graph's memory pool (about one step's activations) and
# copies of the batch's inputs.
GRAPH_CACHE_SIZE = 2
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GRAPHS_LOCK = threading.Lock()


def _graph_key(model, x, lr, threshold, alpha, beta, precision, compile):
    """What a kept graph depends on, or None for models whose state cannot be told (not modules).

    The graph reads F's weights where they lie: in-place changes (an optimizer step, or
    ``load_state_dict``) are seen; new weight tensors give a new key."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        hash(model)
        weakref.ref(model)
    except TypeError:
        return None
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
                    for ts in (model.parameters(), model.buffers()) for t in ts)
    return (tuple(x.shape), x.stride(), x.dtype, str(x.device), float(lr), float(threshold), float(alpha), float(beta),
            precision, bool(compile), CHECK_EVERY, getattr(model, "layer", None), torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cuda"), tensors)


def clear_graph_cache(model=None) -> None:
    """Free the CUDA graphs kept for ``model`` (all models: None) and the GPU memory they hold.

    Kept graphs assume F's forward depends on its parameters and buffers only (as a module in
    eval mode does); after changing anything else it reads (hooks, plain tensor attributes,
    swapped activation modules), clear them or pass ``cuda_graph=False``."""
    with _GRAPHS_LOCK:
        if model is None:
            _GRAPHS.clear()
        else:
            _GRAPHS.pop(model, None)


def _kept_graph(model, key) -> "_Kept | None":
    """The kept graph for ``key``, locked for this call; None if there is none or another thread uses it."""
    with _GRAPHS_LOCK:
        kept = _GRAPHS.get(model, {}).get(key)
        if kept is None or not kept.lock.acquire(blocking=False):
            return None
        _GRAPHS[model].move_to_end(key)
        return kept


def _keep_graph(model, key, graph, part, on) -> "_Kept":
    """Keep a graph this call captured on ``part`` and ``on``; returns it locked (this call still reads it)."""
    kept = _Kept(graph, (*part, on))
    kept.lock.acquire()
    with _GRAPHS_LOCK:
        graphs = _GRAPHS.setdefault(model, OrderedDict())
        graphs[key] = kept
        while len(graphs) > GRAPH_CACHE_SIZE:
            graphs.popitem(last=False)
    return kept


def _cudnn_benchmark(on: bool):
    """cuDNN picks the fastest kernels for the loop's shapes (the loop runs each shape hundreds of times)."""
    return cudnn_setting("benchmark", True) if on else contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_setting(name: str, value):
    """``torch.backends.cudnn.<name> = value`` for the duration (e.g. ``"allow_tf32"``), restored after."""
    old = getattr(torch.backends.cudnn, name)
    setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        setattr(torch.backends.cudnn, name, old)


_COMPILED: dict = {}
# torch.compile's ``dynamic`` for whole batches (False: static shapes; None: torch's default, which
# turns dynamic at the second batch size); a module setting so benchmarks can compare
COMPILE_FULL_DYNAMIC: bool | None = False


def _loss_fn(model, alpha, beta, precision, compile, dynamic=None):
    """``(x~, x, target) -> per-sample loss`` with F under ``precision``; through torch.compile if asked."""
    if not compile:
        return lambda xa, xo, tg: _model_loss(model, xa, xo, tg, alpha, beta, precision)
    k = (float(alpha), float(beta), precision, dynamic)
    if k not in _COMPILED:  # one compiled function; torch.compile keeps a specialisation per model and shape
        _COMPILED[k] = torch.compile(lambda m, xa, xo, tg: _model_loss(m, xa, xo, tg, *k[:3]), dynamic=dynamic)
    fn = _COMPILED[k]
    use = not _failed_before(_NO_COMPILE, model)  # looked up once per call, not per step

    def compiled(xa, xo, tg):
        nonlocal use
        if use:
            try:
                return fn(model, xa, xo, tg)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler for inductor
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                warnings.warn(f"compile: torch.compile failed ({type(e).__name__}: {first}); "
                              "continuing without it", stacklevel=2)
                _failed_before(_NO_COMPILE, model, record=True)
                use = False
        return _model_loss(model, xa, xo, tg, *k[:3])

    return compiled


_NO_COMPILE: "weakref.WeakSet" = weakref.WeakSet()  # models whose compilation failed
_NO_GRAPH: "weakref.WeakSet" = weakref.WeakSet()  # models whose CUDA-graph capture failed


def _failed_before(store: "weakref.WeakSet", model, record: bool = False) -> bool:
    """Whether ``model`` is in ``store`` (after adding it, with ``record=True``)."""
    try:
        if record:
            store.add(model)
        return model in store
    except TypeError:  # not weak-referenceable
        return False


def _model_loss(model, xa, xo, tg, alpha, beta, precision):
    with _autocast(xa.device.type, precision):
        f = model(xa)
    return paper_loss(f.float(), tg, xa, xo, alpha, beta)


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 class or newer); AVX2-only CPUs emulate it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_CPU_BF16_WARNED = False


def _warn_if_emulated_bf16(precision: str, device: torch.device) -> None:
    """Once per process: bf16 asked for on a CPU that emulates it (a speed option that slows things down).
    Called where a call starts (veil, gradient_iteration), never per step: inside a compiled step it would
    break the graph."""
    global _CPU_BF16_WARNED
    if precision != "bf16" or device.type != "cpu" or _CPU_BF16_WARNED or cpu_has_native_bf16():
        return
    _CPU_BF16_WARNED = True
    warnings.warn(f"precision='bf16' on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
                  "oneDNN emulates it, measured 3x (LeNet-5) to 15x (ResNet-18) slower than fp32 on an AVX2 CPU "
                  "(benchmarks/results/throughput_cpu_compile.md); precision='fp32' is faster here", stacklevel=3)


def _autocast(device_type: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    # no weight-cast cache: it must not outlive a CUDA-graph capture (and frozen weights are not cached anyway)
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)


def _channels_last_for(model, sample_shape) -> bool:
    """veil()'s default layout: channels-last for images of 3+ channels (faster convolutions), unless F
    cannot run on it (:func:`takes_channels_last`)."""
    return len(sample_shape) == 3 and sample_shape[0] >= 3 and takes_channels_last(model, tuple(sample_shape))


def auto_batch_size(
    model: Callable[[torch.Tensor], torch.Tensor],
    sample_shape,
    device: torch.device | str,
    *,
    precision: str = "fp32",
    limit: int = 1 << 16,
    cpu_default: int = 512,
    channels_last: bool | None = None,
) -> int:
    """The largest power-of-two batch (<= ``limit``) for which one veil step fits in memory.

    On CUDA: a step on 8 samples gives the memory per sample, the first guess
    is the power of two that fills 80% of free memory, and the guess is halved
    on out-of-memory errors. On other devices returns ``cpu_default`` (on the
    CPU cache-sized batches are fastest, see :func:`veil`). The steps run in the layout
    :func:`veil` uses (``channels_last``; None: as veil() decides, channels-last for 3+
    channels unless F cannot run on it).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_default
    sample_shape = tuple(int(s) for s in sample_shape)
    layout_cl = _channels_last_for(model, sample_shape) if channels_last is None else channels_last

    def try_batch(b):
        z = torch.zeros((b, *sample_shape), device=device)
        if z.ndim == 4 and layout_cl:  # the layout veil() runs in (not for an F that needs contiguous input)
            z = z.contiguous(memory_format=torch.channels_last)
        gradient_iteration(model, z, z, steps=1, threshold=-math.inf, precision=precision)

    clear_graph_cache(model)  # graphs kept from earlier batches would hold memory the new batch needs
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


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_steps(steps: int) -> None:
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars too


def check_settings(*, p, alpha, beta, lr, steps, threshold, output, mode, precision) -> None:
    """Raise a clear ValueError for veil settings that would break or silently invert the veil.

    ``alpha`` > 0 and ``beta`` >= 0 (a negative weight turns the objective around: the
    iteration would push F's output away from the original's), ``lr`` > 0, all finite;
    ``threshold`` a number or ``-inf`` (never stop early).
    """
    check_p(p)
    check_steps(steps)
    for name, v, ok, bar in (("alpha", alpha, lambda v: v > 0, "> 0"), ("beta", beta, lambda v: v >= 0, ">= 0"),
                             ("lr", lr, lambda v: v > 0, "> 0")):
        if not _is_number(v) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{name} must be a finite number {bar}, got {v!r}")
    if not _is_number(threshold) or math.isnan(threshold) or threshold == math.inf:
        raise ValueError(f"threshold must be a number or -inf (never stop early), got {threshold!r}")
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    check_precision(precision)


def device_problem(device) -> str | None:
    """Why ``device`` cannot be used here, in a few words (None if it can): not a torch device,
    or a CUDA / other accelerator that is not there (torch would fail later, with its driver's
    traceback)."""
    try:
        d = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return "not a torch device; use 'cpu', 'cuda' or 'cuda:N'"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            return f"only {n} CUDA GPU{'s' if n != 1 else ''} visible (cuda:0 to cuda:{n - 1})"
    elif d.type not in ("cpu", "meta"):
        backend = getattr(torch, d.type, None) or getattr(torch.backends, d.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            return f"no {d.type} device is visible"
    return None


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device; a one-line ValueError (:func:`device_problem`) if it is unusable."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device: expected a str, torch.device or CUDA index, got {type(device).__name__}")
    why = device_problem(device)
    if why:
        raise ValueError(f"device {str(device)!r}: {why}")
    return torch.device(device)


def _outside_inference_mode(fn):
    """Run ``fn(model, images, ...)`` with autograd available even when called under
    ``torch.inference_mode()`` (Lightning's predict and validation loops): the veil needs dF/dx,
    which inference mode switches off for good. Inference tensors are cloned into ordinary ones."""

    @functools.wraps(fn)
    def wrapper(model, images, **kw):
        if torch.is_inference_mode_enabled() or (isinstance(images, torch.Tensor) and images.is_inference()):
            with torch.inference_mode(False):
                return fn(model, images.clone() if isinstance(images, torch.Tensor) else images, **kw)
        return fn(model, images, **kw)

    return wrapper


@_outside_inference_mode
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
    cuda_graph: bool | None = None,
    compile: bool = False,
    channels_last: bool | None = None,
    fold_bn: bool = False,
    uniforms: torch.Tensor | None = None,
    pad_uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Veil a batch ``[B, C, H, W]`` of uint8 or [0, 1] float images (Algorithm 1).

    The flip mask comes from ``key`` (per-sample, derived from the key and the
    image, see :mod:`veil_transforms.keys`) or, for experiments, ``generator``.
    ``uniforms`` may carry ``keyed_uniforms(key, normalize(images))``
    computed ahead (say, in another thread while the GPU works); with
    ``mode="hardened"``, ``pad_uniforms`` may carry its pad's uniforms likewise
    (``torch.from_numpy(keys.pad_uniforms_np(((uniforms < p) & (normalize(images) != 0)).numpy()))``,
    on the CPU).
    Returns uint8 images for uint8 input; float input gives float in [0, 1],
    snapped to the 256-level grid when ``output == "uint8"``.

    The loop runs on ``device`` (in channels-last layout when ``channels_last``;
    default: for inputs of 3 or more channels), in sub-batches of
    ``chunk`` samples (default: the whole batch on a GPU, 512 on the CPU, where
    cache-sized batches run about 1.5x faster; ``"auto"``: :func:`auto_batch_size`).
    Samples are independent, so chunking does not change the result beyond
    float rounding.

    Speed options (see :func:`gradient_iteration`): ``precision="bf16"`` runs
    F under bf16 autocast, ``cuda_graph`` replays the steps as CUDA graphs on
    CUDA devices (default: on there; ignored elsewhere), ``compile=True`` runs F and the loss
    through ``torch.compile``, ``fold_bn=True`` folds F's BatchNorm layers into
    the convolutions before them (:func:`fold_batchnorm`). Defaults give the
    fp32 loop (on CUDA replayed as graphs: the same veil up to float rounding).

    The first veil on the CPU tunes glibc's allocator for the process
    (:func:`veil_transforms.allocator.tune_for_cpu_veil`: freed blocks are kept
    for the next step instead of page-faulted in anew: 0.70-0.90x the CPU time
    on LeNet-5, benchmarks/results/cpu_allocator.md; ``VEIL_TUNE_ALLOCATOR=0``
    leaves it alone).
    """
    check_pixels(images, "images")
    if images.ndim != 4:
        raise ValueError(f"veil expects a batch [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("veil: empty batch")
    check_settings(p=p, alpha=alpha, beta=beta, lr=lr, steps=steps, threshold=threshold, output=output,
                   mode=mode, precision=precision)
    p, alpha, beta, lr, threshold, steps = float(p), float(alpha), float(beta), float(lr), float(threshold), int(steps)
    if (key is None) == (generator is None):
        raise ValueError("veil: pass exactly one of key= (secret bytes) or generator=")
    if key is not None:
        key = _keys.as_key(key)  # bytes or hex str, >= 16 bytes: the same rule as VeilTransform's
    if chunk is not None and chunk != "auto" and (not is_int(chunk) or chunk < 1):
        raise ValueError(f"chunk must be an integer >= 1, 'auto' or None, got {chunk!r}")
    in_dtype = images.dtype
    device = resolve_device(device) if device is not None else images.device
    gia = MODES[mode]
    takes = inspect.signature(gia).parameters
    fast = {}  # only non-default speed options, so modes without them keep working
    if precision != "fp32":
        fast["precision"] = precision
    if cuda_graph is None:  # default: on for CUDA (same veil up to float rounding, faster in every case measured)
        cuda_graph = device.type == "cuda" and "cuda_graph" in takes
    if cuda_graph and device.type == "cuda":
        fast["cuda_graph"] = True
    if compile:
        fast["compile"] = True
    if pad_uniforms is not None:
        if "pad" not in takes:
            raise ValueError(f"veil: pad_uniforms= is the hardened mode's pad; mode {mode!r} takes none")
        if not isinstance(pad_uniforms, torch.Tensor) or uniforms is None \
                or tuple(pad_uniforms.shape) != tuple(images.shape):
            raise ValueError("veil: pad_uniforms= must be a tensor of the images' shape, with uniforms=")
        # a pad of integers or zeros would start the veil from x itself: checked like the mask's uniforms
        _check_uniforms(pad_uniforms, "pad_uniforms", "keys.pad_uniforms_np of the flip bits")
        fast["pad"] = pad_uniforms
    unsupported = [k for k in fast if k not in takes]
    if unsupported:
        raise ValueError(f"mode {mode!r} does not support {', '.join(unsupported)}")
    _warn_if_emulated_bf16(precision, device)
    if device.type == "cpu":
        tune_for_cpu_veil()  # once per process; VEIL_TUNE_ALLOCATOR=0 leaves glibc's allocator alone
    xn = normalize(images)
    if mode == "hardened":
        _hardened.check_pad_secret(p, xn)
    if uniforms is not None:
        if key is None or tuple(uniforms.shape) != tuple(images.shape):
            raise ValueError("veil: uniforms= must come with key= and have the images' shape")
        _check_uniforms(uniforms, "uniforms", "keyed_uniforms of the images")
        u = uniforms
    else:
        u = keyed_uniforms(key, xn) if key is not None else None
    if pad_uniforms is not None:  # spot check (2 samples' hashing): a pad from elsewhere is not this veil
        for i in sorted({0, len(xn) - 1}):
            bits = ((u[i : i + 1].cpu() < p) & (xn[i : i + 1].cpu() != 0)).numpy()
            if not torch.equal(torch.from_numpy(_keys.pad_uniforms_np(bits)), pad_uniforms[i : i + 1].cpu()):
                raise ValueError(f"veil: pad_uniforms= is not the pad of these images' flip bits (sample {i}: "
                                 "torch.from_numpy(keys.pad_uniforms_np(((uniforms < p) & (normalize(images) != 0))"
                                 ".numpy())))")
    if channels_last is None:  # (after check_model below would be too late: F runs on this layout)
        channels_last = _channels_last_for(model, tuple(xn.shape[1:]))
    xn = xn.to(device).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x0 = random_pixel_flip(xn, p, generator, uniform=None if u is None else u.to(device))
    if chunk is None:
        chunk = len(xn) if device.type == "cuda" else 512
    elif chunk == "auto":
        chunk = auto_batch_size(model, xn.shape[1:], device, precision=precision, channels_last=channels_last)
    # F must take these images, give [B, n] that follows the image differentiably, the same for the
    # same image (else the paper mode runs on its pixel term alone, or a key gives a new veil each
    # time, without an error); once per model and shape
    check_model(model, tuple(images.shape[1:]))
    if fold_bn:
        with frozen(model):  # its own eval() / train() would race with another thread's veil of this model
            model = fold_batchnorm(model)
    try:
        xt = torch.cat([
            gia(model, x0[s : s + chunk], xn[s : s + chunk], alpha=alpha, beta=beta, lr=lr, steps=steps, threshold=threshold,
                **{k: (v[s : s + chunk] if k == "pad" else v) for k, v in fast.items()})
            for s in range(0, len(xn), chunk)
        ])
    except RuntimeError:
        if isinstance(model, torch.nn.Module):  # F refusing these images: say so in one line (ValueError)
            (model if isinstance(model, LocalModel) else LocalModel(model)).check_input(tuple(images.shape[1:]))
        raise
    if not bool(torch.isfinite(xt).all()):  # NaN would come out as black pixels, silently
        raise ValueError(
            "veil: the gradient iteration produced NaN or inf: F's output or its gradient is not finite "
            "on these images (check the model; a smaller lr may help)"
        )
    # in the input's memory layout (the loop runs 3+ channels channels-last): a contiguous batch in, a
    # contiguous one out, so that out.view(len(out), -1) works as it did on the input
    fmt = (torch.channels_last if images.dim() == 4 and not images.is_contiguous()
           and images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    if in_dtype == torch.uint8:
        return denormalize(xt, torch.uint8).contiguous(memory_format=fmt).to(images.device)
    out = denormalize(xt, torch.uint8).float() / 255.0 if output == "uint8" else denormalize(xt, torch.float32)
    return out.contiguous(memory_format=fmt).to(device=images.device, dtype=in_dtype)


def _check_uniforms(u: torch.Tensor, name: str, what: str) -> None:
    """float32 in [0, 1], as the key's SHAKE streams give them (uint32 / 2^32 rounded to float32: the
    top 128 of 2^32 values round to exactly 1.0, about one pixel in 2^25, harmless in the mask and the
    pad, and refusing it failed veil-shard on such an image at every resume); anything else is not
    this key's veil (other dtypes round them, integers or zeros make the flip or the pad a no-op)."""
    if not isinstance(u, torch.Tensor) or u.dtype != torch.float32:
        got = str(u.dtype) if isinstance(u, torch.Tensor) else type(u).__name__
    elif not bool(((u >= 0) & (u <= 1)).all()):
        got = "values out of range"
    else:
        return
    raise ValueError(f"veil: {name}= must be a float32 tensor of values in [0, 1] ({what}), got {got}")


_FOLDED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fold_batchnorm(model):
    """F with every eval-mode BatchNorm folded into the convolution or linear layer before it.

    Exact up to float rounding (F is in eval mode during the veil, so each
    BatchNorm is a fixed per-channel affine map), and it removes one pass over
    every activation, forward and backward. Uses ``torch.fx`` (symbolic
    tracing); a model that cannot be traced, or has no BatchNorm, is returned
    as is. The folded copy is cached per model and rebuilt when any of its
    parameters or buffers changes (tensor version counters).
    """
    if not isinstance(model, torch.nn.Module) or not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return model
    sig = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    hit = _FOLDED.get(model)
    if hit is not None and hit[0] == sig:
        return model if hit[1] is None else hit[1]
    from torch.fx.experimental.optimization import fuse

    modes = modes_of(model)  # each its own: under frozen() F is in eval, its wrapper not
    model.eval()
    try:
        folded = fuse(model)
        for prm in folded.parameters():
            prm.requires_grad_(False)
    except Exception as e:  # noqa: BLE001 - untraceable model: use it unchanged
        warnings.warn(f"fold_bn: cannot trace {type(model).__name__} ({type(e).__name__}); BatchNorm not folded", stacklevel=3)
        folded = None
    finally:
        restore_modes(modes)
    _FOLDED[model] = (sig, folded)  # None: keep the model (no reference to it in the cache)
    return model if folded is None else folded


# mode name -> gradient-iteration function with gradient_iteration's signature.
MODES: dict[str, Callable] = {"paper": gradient_iteration}

from . import hardened as _hardened  # noqa: E402 - registers mode "hardened"
