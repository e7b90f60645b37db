"""The opt-in fast path of the veil loop against the fp32 reference path.

bf16 tolerance, measured on the 200 LFW crops with a LeNet-5 trained to ~92%
(paper settings, 300 steps; and 100 steps without early stop): the veil moves
pixels by ~10 grey levels on average, and the bf16 veil differs from the fp32
one by 0.25-0.3 grey levels on average (2-3% of pixels by more than one level,
a handful by tens of levels where a sample stops one step earlier or later).
The flip mask survives: signs agree on 99.96% of pixels with |x| > 0.5, and F's
argmax agreement with the originals moved by at most 1 point. The bounds below
leave 3-4x margin: mean |diff| <= 1 grey level (a tenth of the veil's own
movement), signs agree on >= 99.5% of large pixels, argmax agreement within 2
points. The fp32 default path is bit-identical to the code before the fast
path existed (checked when it was written; here: options off == defaults).
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from pathlib import Path

import pytest
import numpy as np
import torch

from veil_transforms import allocator, functional as F
from veil_transforms.nets import LeNet5
from veil_transforms.training import accuracy, fit, fit_many

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread in this module


@pytest.fixture(scope="module")
def trained(faces):
    """LeNet-5 trained on the LFW crops (seeded init; the first seed that reaches 85%)."""
    x, y = faces
    for seed in range(5):
        torch.manual_seed(seed)
        m = fit(LeNet5(1, 2), x, y, epochs=20, seed=seed)
        if accuracy(m, x, y) >= 0.85:
            return m
    pytest.fail("LeNet-5 did not train on the LFW crops")


def agreement(model, veiled, originals):
    with torch.no_grad():
        return float((model(F.normalize(veiled)).argmax(1) == model(F.normalize(originals)).argmax(1)).float().mean())


@pytest.mark.parametrize("n, steps, threshold", [(200, 300, 0.3), (64, 100, -math.inf)], ids=["paper", "no-early-stop"])
def test_bf16_veil_matches_fp32(faces, trained, n, steps, threshold):
    x = faces[0][:n]
    kw = dict(steps=steps, threshold=threshold, device="cpu")
    ref = F.veil(trained, x, generator=torch.Generator().manual_seed(0), **kw)
    fast = F.veil(trained, x, generator=torch.Generator().manual_seed(0), precision="bf16", **kw)
    xn, a, b = F.normalize(x), F.normalize(ref), F.normalize(fast)
    big = xn.abs() > 0.5
    assert float((a.sign() == b.sign())[big].float().mean()) >= 0.995  # same mask
    assert float((ref.float() - fast.float()).abs().mean()) <= 1.0  # grey levels
    assert abs(agreement(trained, fast, x) - agreement(trained, ref, x)) <= 0.02
    assert not torch.equal(ref, fast)  # bf16 really ran


def test_hardened_mode_takes_the_speed_options(faces, trained):
    """The mode to ship had none: bf16 was refused on the first batch (after a bf16 warning) and
    CUDA graphs were off by default on a GPU. Same bf16 tolerance as the paper mode (see top):
    measured here 0.20 grey levels mean (200 crops, 75 steps) and 0.25 (64, 100 steps, no stop)."""
    import inspect

    x, key = faces[0][:64], b"\x07" * 32
    kw = dict(key=key, mode="hardened", steps=40, device="cpu")
    ref = F.veil(trained, x, **kw)
    fast = F.veil(trained, x, precision="bf16", **kw)
    assert not torch.equal(ref, fast)  # bf16 really ran
    assert float((ref.float() - fast.float()).abs().mean()) <= 1.0
    assert abs(agreement(trained, fast, x) - agreement(trained, ref, x)) <= 0.02
    params = inspect.signature(F.MODES["hardened"]).parameters
    assert {"precision", "cuda_graph", "compile"} <= set(params)  # so veil() turns graphs on for CUDA


def test_unsupported_option_is_refused_before_any_warning(faces, trained, monkeypatch):
    def other_mode(model, x_start, x, *, alpha, beta, lr, steps, threshold):
        return x_start

    monkeypatch.setitem(F.MODES, "other", other_mode)
    monkeypatch.setattr(F, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(F, "_CPU_BF16_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="does not support precision"):
            F.veil(trained, faces[0][:2], generator=torch.Generator(), steps=2, mode="other", precision="bf16",
                   device="cpu")
    assert not [w for w in caught if "bf16" in str(w.message)]


def test_masked_loop_equals_compacting_loop(faces, trained, monkeypatch):
    """Stopped samples kept in the batch but masked (as on a GPU between checks) == dropped at once (CPU default)."""
    xn = F.normalize(faces[0][:64])
    x0 = F.random_pixel_flip(xn, 0.5, torch.Generator().manual_seed(1))
    kw = dict(steps=60, threshold=0.3, return_stats=True)
    ref, s_ref = F.gradient_iteration(trained, x0, xn, **kw)
    monkeypatch.setattr(F, "CHECK_EVERY_CPU", 7)  # look only every 7 steps: samples stop mid-block
    got, s_got = F.gradient_iteration(trained, x0, xn, **kw)
    steps = s_ref["steps"]
    assert (steps < 60).any() and (steps > 10).any() and (steps == 60).any()  # stops early, late and never
    assert torch.equal(s_got["steps"], steps)
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(s_got["loss"], s_ref["loss"], atol=1e-5)


def test_options_off_are_the_default_path(faces, trained):
    x = faces[0][:16]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = F.veil(trained, x, generator=g(), steps=20, device="cpu")
    assert torch.equal(F.veil(trained, x, generator=g(), steps=20, device="cpu", precision="fp32", cuda_graph=True), ref)
    assert torch.equal(F.veil(trained, x, generator=g(), steps=20, device="cpu", chunk="auto"), ref)
    assert F.auto_batch_size(trained, (1, 25, 25), "cpu") == 512


def test_fast_options_are_checked(faces, trained, monkeypatch):
    x = faces[0][:2]
    with pytest.raises(ValueError, match="precision"):
        F.veil(trained, x, generator=torch.Generator(), steps=2, precision="fp16")
    xn = F.normalize(x)
    with pytest.raises(ValueError, match="precision"):
        F.gradient_iteration(trained, xn, xn, steps=2, precision="bfloat16")

    def other_mode(model, x_start, x, *, alpha, beta, lr, steps, threshold):
        return x_start

    monkeypatch.setitem(F.MODES, "other", other_mode)
    with pytest.raises(ValueError, match="does not support precision"):
        F.veil(trained, x, generator=torch.Generator(), steps=2, mode="other", precision="bf16")
    assert F.veil(trained, x, generator=torch.Generator(), steps=2, mode="other").shape == x.shape


def test_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch):
    """bf16 is a speed option; on an AVX2-only CPU oneDNN emulates it and it runs 3-15x slower than fp32
    (benchmarks/results/throughput_cpu_compile.md): say so once, keep the veil the user asked for."""
    assert isinstance(F.cpu_has_native_bf16(), bool)
    model, x = LeNet5().eval(), torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)

    def messages(**kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                F.veil(model, x, generator=torch.Generator().manual_seed(0), steps=2, device="cpu", **kw)
        return [str(w.message) for w in caught if "native bf16" in str(w.message)]

    monkeypatch.setattr(F, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(F, "_CPU_BF16_WARNED", False)
    assert messages(precision="fp32") == []
    got = messages(precision="bf16")
    assert len(got) == 1 and "precision='fp32' is faster" in got[0], got
    monkeypatch.setattr(F, "_CPU_BF16_WARNED", False)
    monkeypatch.setattr(F, "cpu_has_native_bf16", lambda: True)
    assert messages(precision="bf16") == []


def _benchmark_module(name="throughput"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lenet_rewrites_in_the_levers_benchmark_are_exact():
    """benchmarks/mnist60k_levers.py's rewrites of LeNet-5 (conv1's input gradient as shifted products,
    the even adaptive pool as a max pool) must compute the same function and gradients with the same
    weight tensors, or their GPU timings compare different work (float64: only summation order differs)."""
    bench = _benchmark_module("mnist60k_levers")
    torch.manual_seed(0)
    m = LeNet5(1, 10).double().eval()
    r = bench.rewrite(m)
    assert r.conv1.weight is m.conv1.weight and r.fc3.weight is m.fc3.weight
    for hw in (28, 27):  # conv2's output 10x10 (pooled as 2x2) and 9x9 (not a multiple of 5: adaptive)
        x = torch.randn(5, 1, hw, hw, dtype=torch.float64, requires_grad=True)
        y, yr = m(x), r(x)
        assert torch.equal(y, yr)
        g = torch.randn_like(y)
        want = torch.autograd.grad(y, [x, *m.parameters()], g)
        got = torch.autograd.grad(yr, [x, *r.parameters()], g)
        assert float(want[0].abs().max()) > 1e-4  # not a vanishing gradient compared with nothing
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    # the input gradient alone, wider channels, against the convolution it writes out
    gout, w = torch.randn(3, 4, 9, 9, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(bench.shifted_input_grad(gout, w, (9, 9), 1),
                               torch.nn.functional.conv_transpose2d(gout, w, padding=1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="stride-1"):
        bench._ShiftedGradConv2d(torch.nn.Conv2d(1, 2, 3, stride=2))


def test_precision_benchmark_takes_the_error_over_keys():
    """benchmarks/precision_utility.py's bar is decided by these: a veil draw (key) is the unit, not a seed."""
    bench = _benchmark_module("precision_utility")
    ref = np.zeros((2, 2))
    mean, se, per_key = bench.paired([[0.01, 0.03], [0.03, 0.05]], ref)  # keys x seeds
    assert per_key == pytest.approx([0.02, 0.04]) and mean == pytest.approx(0.03)
    assert se == pytest.approx(np.std([0.02, 0.04], ddof=1) / np.sqrt(2))  # from the per-key means, not the 4 values
    # the seeds disagree, the keys agree: no key-to-key spread, so no error
    assert bench.paired([[-0.01, 0.01], [0.01, -0.01]], ref)[1] == pytest.approx(0.0)
    _, se1, _ = bench.paired([[0.01, 0.03]], np.zeros((1, 2)))  # one key: over seeds
    assert se1 == pytest.approx(np.std([0.01, 0.03], ddof=1) / np.sqrt(2))
    assert bench.t95(5) == 2.57 and bench.t95(11) == 2.23 and bench.t95(100) == 1.96 and bench.t95(0) == math.inf
    assert bench.key_for(0) == bytes(range(32)) and len({bench.key_for(k) for k in range(8)}) == 8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_fit_many_trains_each_model_like_fit(faces, device):
    """precision_utility's GPU trainer: M vmapped LeNets end where fit takes each one (same SGD, momentum,
    weight decay, cosine schedule, batch order). Measured on the CPU: 2e-7 relative after 3 epochs;
    bound 1e-3 (rounding can meet a ReLU or max-pool flip: 2.5e-4 was seen on other data).
    A constant learning rate, or a momentum buffer started at a tenth of the first step, moves the
    weights by > 1e-2."""
    x, y = faces
    sets = torch.stack([x, x.flip(-1), 255 - x])  # one training set per model
    seeds = [0, 1, 2]

    def net(s):
        torch.manual_seed(s)
        return LeNet5(1, 2)

    with F.cudnn_setting("allow_tf32", False):
        many = fit_many([net(s) for s in seeds], sets, y, seeds=seeds, epochs=3, batch_size=32, device=device)
        one = [fit(net(s), sets[i], y, epochs=3, seed=s, batch_size=32, device=device) for i, s in enumerate(seeds)]
    for a, b in zip(many, one):
        assert not a.training
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            rel = float(((pa - pb).abs().max() / pb.abs().max()).detach())
            assert rel < 1e-3, (name, rel)
    shared = fit_many([net(5)], x, y, seeds=[5], epochs=1, device=device)[0]  # one set for all models
    ref = fit(net(5), x, y, epochs=1, seed=5, device=device)
    assert torch.allclose(shared.fc3.weight, ref.fc3.weight, rtol=0, atol=1e-4)


def test_warm_up_does_nothing_off_cuda():
    from veil_transforms import VeilTransform

    veil = VeilTransform(LeNet5(), key=bytes(32), device="cpu")
    assert veil.warm_up(4, (1, 28, 28)) is False
    assert not F._GRAPHS
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        veil.warm_up(0, (1, 28, 28))


def test_fit_many_refuses_what_it_cannot_train(faces):
    x, y = faces
    with pytest.raises(ValueError, match="2 models but 1 seeds"):
        fit_many([LeNet5(1, 2), LeNet5(1, 2)], x, y, seeds=[0])
    with pytest.raises(ValueError, match="3 sets for 2 models"):
        fit_many([LeNet5(1, 2), LeNet5(1, 2)], torch.stack([x, x, x]), y, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\]"):
        fit_many([LeNet5(1, 2)], x[0], y, seeds=[0])
    with pytest.raises(ValueError, match="labels of shape"):
        fit_many([LeNet5(1, 2)], x, y[:10], seeds=[0])
    with pytest.raises(ValueError, match="BatchNorm2d"):
        fit_many([torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))], x, y, seeds=[0])
    with pytest.raises(ValueError, match="Dropout2d"):
        fit_many([torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Dropout2d())], x, y, seeds=[0])

def test_precision_benchmark_pairs_by_key_when_a_config_fails():
    """A fast config that failed for a key (say, a compiler missing) is paired with fp32 on the keys it has."""
    import types

    bench = _benchmark_module("precision_utility")
    common = {"true_loss": [1.0] * 3, "F_agreement": [1.0] * 3, "veil_seconds_incl_warmup": [1.0] * 3}
    rows = {"fp32 (reference)": {"key": [0, 1, 2], "acc_on_X": [[0.9, 0.9], [0.5, 0.5], [0.7, 0.7]], **common},
            "bf16": {"key": [0, 2], "acc_on_X": [[0.91, 0.91], [0.72, 0.72]], "failed": [{"key": 1, "error": "Boom"}],
                     **{k: v[:2] for k, v in common.items()}}}
    args = types.SimpleNamespace(n_train=1, n_test=1, seeds=[0, 1], keys=3, trainer="one", mode="paper", steps=300)
    c = bench.summarize(rows, args, "cmd", "CPU", [])["configs"]["bf16"]
    assert c["paired_keys"] == [0, 2] and c["paired_diff_per_key"] == pytest.approx([0.01, 0.02])  # not key 1's 0.5
    md = "\n".join(bench.markdown(bench.summarize(rows, args, "cmd", "CPU", []), args))
    assert "failed for 1 key(s) (Boom)" in md and "Student t, 1 dof" in md


class _HeavyOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that carry a step's arithmetic (convolutions, matmuls, pools, forward and
    backward), with their input shapes: the same count means the same FLOPs."""

    HEAVY = ("convolution", "mm", "addmm", "max_pool2d", "adaptive_max_pool2d")

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(name == h or name.startswith(h + "_") for h in self.HEAVY):
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            self.seen[(name, shapes)] = self.seen.get((name, shapes), 0) + 1
        return func(*args, **(kwargs or {}))


def test_library_not_slower_than_plain_batched_loop():
    """The CPU benchmark's core comparison on a small case, the library's fp32 veil against the plain
    loop, checked two ways:

    * work, exactly: the same heavy aten ops (convolutions, matmuls, pools, forward and backward) with
      the same shapes, as many times. A library step doing a second forward fails this on any machine.
    * time: the median of 9 back-to-back pairs (order alternating) of process CPU times <= 1.15.

    The time check failed once in CI (median 1.18, pairs 1.02-1.33) while passing on the development
    VM. The cause found: page faults. With glibc's default allocator every step maps its large blocks
    afresh, and kernel time was 16-21% of the loop's CPU time; the library's allocation pattern
    faulted 30-50% more than the plain loop's (80-84k against 54-65k per run, fresh processes,
    ``python benchmarks/cpu_allocator.py``), and how many depends on the heap's history. veil() on the
    CPU now tunes the allocator (``veil_transforms.allocator``), which removes the faults for both
    loops in this process, so what is left to compare is the arithmetic and the Python around it."""
    bench = _benchmark_module()
    torch.manual_seed(0)
    model = LeNet5(1, 10).eval()
    images = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    xn = F.normalize(images)
    x0 = F.random_pixel_flip(xn, 0.5, torch.Generator().manual_seed(0))
    steps, thr = 20, -math.inf
    F.check_model(model, (1, 28, 28))  # veil()'s once-per-model check of F (three batch-2 forwards) done
    runs = {
        "plain": lambda: bench.plain_batched(model, x0, xn, steps, thr),
        "library": lambda: F.veil(model, images, generator=torch.Generator().manual_seed(0), steps=steps, threshold=thr, device="cpu"),
    }
    out, ops = {}, {}
    for k, f in runs.items():  # also the warm-up; same inputs, same result
        with _HeavyOps() as counter:
            out[k] = f()
        ops[k] = counter.seen
    assert torch.equal(F.denormalize(out["plain"]), out["library"])
    assert ops["library"] == ops["plain"] and sum(ops["plain"].values()) >= steps * 10, (ops["library"], ops["plain"])
    ratios = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process CPU time of one thread: OpenMP threads spinning on busy cores would count too
    try:
        for i in range(9):  # pairs back to back: a slow spell of the machine hits both sides of a pair
            t = {}
            for k, f in (runs.items() if i % 2 == 0 else reversed(runs.items())):
                t0 = time.process_time()
                f()
                t[k] = time.process_time() - t0
            ratios.append(t["library"] / t["plain"])
    finally:
        torch.set_num_threads(threads)
    # the machine and the allocator state in the message: CI's CPU is not the development VM's
    assert sorted(ratios)[4] <= 1.15, (ratios, bench.device_name(torch.device("cpu")), allocator._TUNED)


# -- CUDA only (skipped on CPU machines) ----------------------------------------------------
@pytest.fixture
def no_tf32():
    """cuDNN in true fp32 for the duration. With TF32 (cuDNN's default) a batch of another size can
    get another convolution kernel, whose rounding (~1e-3 relative per step) 50 steps amplify to
    ~1e-2 (1 grey level; seen on an H100 between the eager and the graph loop, which compact
    at different moments). These tests check the loop's machinery, not cuDNN's kernel choice."""
    with F.cudnn_setting("allow_tf32", False):
        yield


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_matches_eager(faces, trained, precision, no_tf32):
    m = LeNet5(1, 2).cuda()
    m.load_state_dict(trained.state_dict())
    xn = F.normalize(faces[0]).cuda().contiguous(memory_format=torch.channels_last)
    x0 = F.random_pixel_flip(xn.cpu(), 0.5, torch.Generator().manual_seed(1)).cuda().contiguous(memory_format=torch.channels_last)
    for threshold in (0.3, -math.inf):
        kw = dict(steps=50, threshold=threshold, return_stats=True, precision=precision)
        ref, s_ref = F.gradient_iteration(m, x0, xn, **kw)
        got, s_got = F.gradient_iteration(m, x0, xn, cuda_graph=True, **kw)
        if precision == "fp32":
            # The eager loop compacts the batch, and with cudnn.benchmark each batch size may get
            # another convolution kernel (fp32 here, see no_tf32): a sample whose loss sits at the
            # threshold can stop one step apart (seen on an H100 with TF32: 1 sample in 200).
            # Samples that stop at the same step must agree to float rounding.
            same = s_got["steps"] == s_ref["steps"]
            assert float(same.float().mean()) >= 0.98
            assert torch.allclose(got[same], ref[same], atol=2e-3), float((got - ref)[same].abs().max())
        else:
            # bf16: the captured graph and the eager loop may pick different bf16 kernels, so a
            # sample whose loss sits at the threshold can stop one step apart (seen on an H200).
            # Hold them to the bf16-vs-fp32 tolerance instead.
            assert float((s_got["steps"] != s_ref["steps"]).float().mean()) <= 0.05
            grey = (F.denormalize(got).float() - F.denormalize(ref).float()).abs()
            assert float(grey.mean()) <= 1.0, float(grey.mean())


@cuda
def test_kept_graph_replays_other_batches_and_follows_the_weights(faces, trained, no_tf32):
    """A later call with the same model and batch shape replays the graph an earlier call captured:
    it must veil its own inputs, leave the earlier result alone, and read F's current weights."""
    m = LeNet5(1, 2).cuda()
    m.load_state_dict(trained.state_dict())
    xs = [F.normalize(faces[0][i * 64:(i + 1) * 64]).cuda() for i in range(3)]
    x0s = [F.random_pixel_flip(x.cpu(), 0.5, torch.Generator().manual_seed(i)).cuda() for i, x in enumerate(xs)]
    kw = dict(steps=40, threshold=-math.inf)

    def check(i):
        ref = F.gradient_iteration(m, x0s[i], xs[i], **kw)
        got = F.gradient_iteration(m, x0s[i], xs[i], cuda_graph=True, **kw)
        assert torch.allclose(got, ref, atol=2e-3), float((got - ref).abs().max())
        return got

    F.clear_graph_cache(m)
    first = check(0)
    kept = F._GRAPHS[m]
    assert len(kept) == 1
    graph = next(iter(kept.values())).graph
    saved = first.clone()
    check(1)  # replayed (same graph object), on other inputs
    assert next(iter(F._GRAPHS[m].values())).graph is graph
    assert torch.equal(first, saved)  # the earlier result is not the graph's buffer
    with torch.no_grad():
        m.fc3.weight.mul_(-1)  # F changed in place (say, an optimizer step): the same graph sees it
    check(2)
    assert len(F._GRAPHS[m]) == 1
    for p in m.parameters():  # new weight tensors: a new graph
        p.data = p.data.clone()
    check(2)
    assert len(F._GRAPHS[m]) == 2
    # with the early stop: the same stop steps as the eager loop (to the TF32 tolerance of
    # test_cuda_graph_matches_eager), and a later call replays a graph whose mask was reset
    kw = dict(steps=60, threshold=0.3, return_stats=True)
    for i in (0, 1, 0):
        ref, s_ref = F.gradient_iteration(m, x0s[i], xs[i], **kw)
        got, s_got = F.gradient_iteration(m, x0s[i], xs[i], cuda_graph=True, **kw)
        assert float((s_got["steps"] == s_ref["steps"]).float().mean()) >= 0.95


@cuda
@pytest.mark.parametrize("threshold", [-math.inf, 0.3], ids=["no-early-stop", "paper-threshold"])
def test_warm_up_captures_the_graph_the_first_batch_replays(faces, trained, no_tf32, threshold):
    """VeilTransform.warm_up (veil-shard runs it on its GPU thread while the first batch decodes):
    the first real batch of that size replays the warm-up's graph, captures none of its own, and
    gets the veil it gets without a warm-up (to one grey level: the kept-graph tolerance above).
    With the paper's threshold most of the dummy noise stops within the 3 eager steps before the
    capture (71% on CPU with this model, real faces 9.5%): the warm-up captures all the same."""
    from veil_transforms import VeilTransform

    x = faces[0][:64]
    kw = dict(key=bytes(range(32)), device="cuda", steps=40, threshold=threshold, cuda_graph=True)
    m = LeNet5(1, 2)
    m.load_state_dict(trained.state_dict())
    ref = VeilTransform(m, **kw).veil_batch(x)
    warm = VeilTransform(m, **kw)
    F.clear_graph_cache()
    assert warm.warm_up(64, tuple(x.shape[1:]))
    (graphs,) = F._GRAPHS.values()
    assert len(graphs) == 1
    (g,) = (k.graph for k in graphs.values())
    got = warm.veil_batch(x)
    (graphs,) = F._GRAPHS.values()
    assert len(graphs) == 1 and next(iter(graphs.values())).graph is g
    d = (got.int() - ref.int()).abs()
    if threshold == -math.inf:
        assert int(d.max()) <= 1 and float(d.float().mean()) < 0.05, (int(d.max()), float(d.float().mean()))
    else:  # a sample on the threshold may stop a step apart (>= 95% same stop steps, as above)
        assert float((d.flatten(1).amax(1) > 1).float().mean()) <= 0.05 and float(d.float().mean()) < 0.1


@cuda
def test_all_gpu_levers_give_the_same_veil(faces):
    """bf16 + CUDA graph + compile + folded BatchNorm against the fp32 eager loop (bf16 tolerance, see top)."""
    torch.manual_seed(0)
    m = SmallBN().cuda().eval()
    x = faces[0][:128]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(steps=60, threshold=-math.inf, device="cuda")
    ref = F.veil(m, x, generator=g(), **kw)
    for opts in ({"cuda_graph": True, "compile": True, "fold_bn": True},
                 {"precision": "bf16", "cuda_graph": True, "compile": True, "fold_bn": True}):
        got = F.veil(m, x, generator=g(), **kw, **opts)
        grey = (got.float() - ref.float()).abs()
        assert float(grey.mean()) <= (0.1 if "precision" not in opts else 1.0), (opts, float(grey.mean()))
    # the hardened mode (the one to ship) through the same levers; CUDA graphs are its default on a GPU too
    hk = dict(key=b"\x07" * 32, mode="hardened", steps=60, threshold=-math.inf, device="cuda")
    ref = F.veil(m, x, cuda_graph=False, **hk)
    for opts in ({}, {"precision": "bf16", "compile": True, "fold_bn": True}):
        got = F.veil(m, x, **hk, **opts)
        grey = (got.float() - ref.float()).abs()
        assert float(grey.mean()) <= (0.1 if "precision" not in opts else 1.0), (opts, float(grey.mean()))


@cuda
def test_cuda_graph_capture_failure_falls_back(faces):
    class Syncs(LeNet5):
        def forward(self, x):
            if float(x.abs().sum()) < 0:  # a host sync: not capturable
                raise AssertionError
            return super().forward(x)

    torch.manual_seed(0)
    m = Syncs(1, 2).cuda()
    xn = F.normalize(faces[0][:32]).cuda()
    x0 = -xn
    with pytest.warns(UserWarning, match="capture failed"):
        got = F.gradient_iteration(m, x0, xn, steps=30, threshold=-math.inf, cuda_graph=True)
    ref = F.gradient_iteration(m, x0, xn, steps=30, threshold=-math.inf)
    assert torch.allclose(got, ref, atol=1e-4)
    with warnings.catch_warnings():  # remembered: no second attempt, no second warning
        warnings.simplefilter("error")
        again = F.veil(m, faces[0][:32], generator=torch.Generator().manual_seed(0), steps=30, device="cuda")
    assert again.shape == (32, 1, 25, 25)


@cuda
def test_auto_batch_size_cuda():
    m = LeNet5(1, 10).cuda()
    b = F.auto_batch_size(m, (1, 28, 28), "cuda", limit=4096)
    assert b == 4096
    images = torch.randint(0, 256, (600, 1, 28, 28), dtype=torch.uint8)
    out = F.veil(m, images, generator=torch.Generator().manual_seed(0), steps=3, device="cuda", chunk="auto")
    assert out.shape == images.shape


# -- result-preserving levers, checked on the CPU --------------------------------------------
class SmallBN(torch.nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> pool -> linear, with non-trivial BN statistics."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 3)
        g = torch.Generator().manual_seed(0)
        for b in (self.b1, self.b2):
            b.running_mean.copy_(torch.randn(8, generator=g))
            b.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            b.weight.data.copy_(torch.rand(8, generator=g) + 0.5)
            b.bias.data.copy_(torch.randn(8, generator=g))

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.b2(self.c2(x))
        return self.fc(x.mean((2, 3)))


def test_fold_batchnorm_same_function_and_same_veil(faces):
    torch.manual_seed(0)
    m = SmallBN().eval()
    folded = F.fold_batchnorm(m)
    assert not any(isinstance(q, torch.nn.BatchNorm2d) for q in folded.modules())
    assert isinstance(m.b1, torch.nn.BatchNorm2d)  # the original is untouched
    xn = F.normalize(faces[0][:32])
    with torch.no_grad():
        assert torch.allclose(folded(xn), m(xn), atol=1e-5)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = F.veil(m, faces[0][:32], generator=g(), steps=30, device="cpu", output="float")
    got = F.veil(m, faces[0][:32], generator=g(), steps=30, device="cpu", output="float", fold_bn=True)
    assert float((got - ref).abs().max()) * 255 <= 1.0  # at most one grey level anywhere
    assert F.fold_batchnorm(m) is folded  # cached while the weights are unchanged
    with torch.no_grad():
        m.c1.weight.mul_(2)  # the owner keeps training F: the folded copy must follow
    again = F.fold_batchnorm(m)
    assert again is not folded
    with torch.no_grad():
        assert torch.allclose(again(xn), m(xn), atol=1e-4)
    assert m.training is False and all(p.requires_grad for p in m.parameters())


def test_fold_batchnorm_leaves_other_models_alone(trained):
    assert F.fold_batchnorm(trained) is trained  # no BatchNorm

    class Untraceable(SmallBN):
        def forward(self, x):
            if float(x.sum()) > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                return x
            return super().forward(x)

    m = Untraceable().eval()
    with pytest.warns(UserWarning, match="BatchNorm not folded"):
        assert F.fold_batchnorm(m) is m


def test_compile_gives_the_same_veil(faces):
    """torch.compile of F and the loss (inductor on the CPU here) == the eager loop, within float rounding."""
    pytest.importorskip("torch._inductor")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.c(x)).amax((2, 3)))

    torch.manual_seed(0)
    m = Tiny().eval()
    xn = F.normalize(faces[0][:16])
    x0 = F.random_pixel_flip(xn, 0.5, torch.Generator().manual_seed(2))
    kw = dict(steps=12, threshold=0.05, return_stats=True)
    ref, s_ref = F.gradient_iteration(m, x0, xn, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, s_got = F.gradient_iteration(m, x0, xn, compile=True, **kw)
    if any("torch.compile failed" in str(w.message) for w in caught):
        pytest.skip("torch.compile cannot build here (e.g. no C++ compiler for inductor's CPU backend)")
    assert torch.equal(s_got["steps"], s_ref["steps"])
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())


def test_compile_failure_warns_once_and_goes_on(faces, trained, monkeypatch):
    """A machine where torch.compile cannot build (no C++ compiler, say): one warning, same veil, eager after."""
    real = torch.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=broken_backend))
    monkeypatch.setattr(F, "_COMPILED", {})
    x = faces[0][:8]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = F.veil(trained, x, generator=g(), steps=4, device="cpu")
    with pytest.warns(UserWarning, match="torch.compile failed"):
        got = F.veil(trained, x, generator=g(), steps=4, device="cpu", compile=True)
    assert torch.equal(got, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(F.veil(trained, x, generator=g(), steps=4, device="cpu", compile=True), ref)
    F._NO_COMPILE.discard(trained)


def test_precomputed_uniforms_and_threshold_minus_inf(faces, trained):
    from veil_transforms import VeilTransform

    x = faces[0][:8]
    t = VeilTransform(trained, key=bytes(range(32)), steps=5, threshold=-math.inf, device="cpu")
    u = t.uniforms(x)
    assert torch.equal(t.veil_batch(x, u), t.veil_batch(x))
    assert not torch.equal(t.veil_batch(x, 1 - u), t.veil_batch(x))  # the given uniforms are the ones used
    with pytest.raises(ValueError, match="uniforms"):
        t.veil_batch(x, u[:4])
    with pytest.raises(ValueError, match="threshold"):
        VeilTransform(trained, threshold=math.nan)


def test_batched_keyed_uniforms_equal_per_sample():
    from veil_transforms import keys

    key = keys.new_key()
    xn = F.normalize(torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8))
    one = torch.stack([keys.keyed_uniform(key, keys.sample_digest(key, s), (3, 7, 9)) for s in xn])
    assert torch.equal(F.keyed_uniforms(key, xn), one)


def test_fit_many_per_model_labels():  # T2 T4
    from veil_transforms.training import fit, fit_many

    x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ys = torch.stack([torch.arange(32) % 2, (torch.arange(32) // 2) % 2])

    def net(s):
        torch.manual_seed(s)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))

    many = fit_many([net(0), net(1)], x, ys, seeds=[0, 1], epochs=1, batch_size=16)
    for i in range(2):
        one = fit(net(i), x, ys[i], epochs=1, seed=i, batch_size=16)
        assert torch.allclose(many[i][1].weight, one[1].weight, atol=1e-5)
    with pytest.raises(ValueError, match="labels of shape"):
        fit_many([net(0), net(1), net(2)], x, ys, seeds=[0, 1, 2])
