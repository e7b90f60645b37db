"""Behaviour of the pure functions, the model adapter, VeilTransform and VeiledDataset."""

import copy
import pickle
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn
from torchvision import tv_tensors

from veil_transforms import LocalModel, VeiledDataset, VeilTransform
from veil_transforms import functional as F
from veil_transforms import keys
from veil_transforms.nets import LeNet5

KEY = bytes(range(32))
FAST = dict(steps=25, device="cpu")


def close_veils(a: torch.Tensor, b: torch.Tensor, frac: float = 0.01) -> bool:
    """The issue's tolerance: at most ``frac`` of pixels more than one grey level apart."""
    d = (a.int() - b.int()).abs()
    return float((d > 1).float().mean()) <= frac


# -- pure functions ---------------------------------------------------------------------------
def test_normalize_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    xn = F.normalize(x)
    assert xn.min() == -1 and xn.max() == 1
    assert torch.equal(F.denormalize(xn), x)
    assert torch.allclose(F.normalize(x.float() / 255), xn)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_flip_ratio_is_p(p):
    x = torch.rand(8, 3, 64, 64) * 0.9 + 0.05  # no zeros, so a flip always changes the sign
    g = torch.Generator().manual_seed(0)
    flipped = F.random_pixel_flip(x, p, g)
    assert abs(float((flipped < 0).float().mean()) - p) < 0.01
    assert torch.equal(flipped.abs(), x)
    # keyed masks too, per sample
    u = F.keyed_uniforms(KEY, x)
    ratio = (F.random_pixel_flip(x, p, uniform=u) < 0).flatten(1).float().mean(1)
    assert torch.allclose(ratio, torch.full_like(ratio, p), atol=0.02)


def test_keyed_masks_depend_on_key_and_content_only():
    x = torch.rand(4, 1, 10, 10)
    u1 = F.keyed_uniforms(KEY, x)
    assert torch.equal(u1, F.keyed_uniforms(KEY, x))  # deterministic
    assert torch.equal(u1[2:], F.keyed_uniforms(KEY, x[2:]))  # per sample, batch-independent
    assert not torch.equal(u1, F.keyed_uniforms(b"\x01" * 32, x))  # another key
    x2 = x.clone()
    x2[0, 0, 0, 0] += 0.01
    assert not torch.equal(u1[0], F.keyed_uniforms(KEY, x2)[0])  # another image


def test_keyed_masks_follow_the_formula_in_keys_docstring():
    """keys' module docstring is the spec a third implementation (or an auditor) re-derives masks from:
    it gave SHAKE-256(key || digest), without the "veil-mask" tag the code hashes (a helper's review)."""
    import hashlib
    import hmac

    x = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8)
    xn = F.normalize(x).float().numpy()
    digest = hmac.new(KEY, b"veil-sample" + np.asarray(xn.shape, np.int64).tobytes() + xn.tobytes(),
                      hashlib.sha256).digest()
    raw = hashlib.shake_256(b"veil-mask" + KEY + digest).digest(4 * xn.size)
    u = (np.frombuffer(raw, "<u4").astype(np.float64) / 2**32).astype(np.float32).reshape(xn.shape)
    assert np.array_equal(u, F.keyed_uniforms(KEY, F.normalize(x)[None])[0].numpy())
    assert '"veil-mask" || key || digest' in keys.__doc__ and "shape (int64)" in keys.__doc__


def test_opaque_keys_are_dot_free_and_hide_names():
    k = keys.opaque_key(KEY, "George_W_Bush/George_W_Bush_0001.jpg")
    assert "." not in k and "Bush" not in k and len(k) == 32
    assert k == keys.opaque_key(KEY, "George_W_Bush/George_W_Bush_0001.jpg")
    assert k != keys.opaque_key(b"\x02" * 32, "George_W_Bush/George_W_Bush_0001.jpg")


def test_gradient_iteration_lowers_the_feature_loss(faces, face_model):
    x = F.normalize(faces[0][:16])
    x0 = F.random_pixel_flip(x, 0.5, torch.Generator().manual_seed(0))
    target = face_model(x).detach()
    before = (face_model(x0) - target).abs().sum(1).detach()
    xt, stats = F.gradient_iteration(face_model, x0, x, steps=50, threshold=-1.0, return_stats=True)
    after = (face_model(xt) - target).abs().sum(1).detach()
    assert float(after.mean()) < 0.5 * float(before.mean())
    assert torch.equal(stats["steps"], torch.full((16,), 50))


# -- batching, determinism, keys ------------------------------------------------------------
def test_batched_equals_one_at_a_time_with_per_sample_early_stop(faces, face_model):
    x = faces[0][:24]
    # a threshold that some samples reach early and others never: each stops on its own
    xn = F.normalize(x)
    x0 = F.random_pixel_flip(xn, 0.5, uniform=F.keyed_uniforms(KEY, xn))
    with torch.no_grad():
        start = (face_model(x0) - face_model(xn)).abs().sum(1)
    thr = float(start.quantile(0.5))
    _, stats = F.gradient_iteration(face_model, x0, xn, steps=40, threshold=thr, return_stats=True)
    assert len(set(stats["steps"].tolist())) >= 3, stats["steps"]  # samples stop at different steps
    t = VeilTransform(face_model, key=KEY, steps=40, threshold=thr, device="cpu")
    batched = t(x)
    single = torch.stack([t(xi) for xi in x])
    assert close_veils(batched, single)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    assert close_veils(t(x[perm]), batched[perm])  # any order / composition
    assert close_veils(t(x[5:9]), batched[5:9])
    # the same mask whichever way: signs agree wherever a pixel is far from mid-grey
    far = (x.int() - 128).abs() > 60
    assert torch.equal((batched.int() > 127)[far], (single.int() > 127)[far])


def test_same_call_twice_is_bit_identical(faces, face_model):
    t = VeilTransform(face_model, key=KEY, **FAST)
    x = faces[0][:8]
    assert torch.equal(t(x), t(x))


def test_same_key_same_veil_other_key_other_veil(faces, face_model):
    x = faces[0][:8]
    a = VeilTransform(face_model, key=KEY, **FAST)(x)
    b = VeilTransform(face_model, key=KEY.hex(), **FAST)(x)
    c = VeilTransform(face_model, key=b"\x07" * 32, **FAST)(x)
    assert torch.equal(a, b)
    assert float((a != c).float().mean()) > 0.3


def test_no_key_draws_a_secret_one_that_can_be_saved(faces, face_model):
    t1, t2 = VeilTransform(face_model, **FAST), VeilTransform(face_model, **FAST)
    assert isinstance(t1.key, bytes) and len(t1.key) == 32 and t1.key != t2.key
    x = faces[0][:4]
    assert torch.equal(t1(x), VeilTransform(face_model, key=t1.key, **FAST)(x))
    assert t1.key.hex() not in repr(t1)


def test_veil_hides_the_image(faces, face_model):
    from veil_transforms.metrics import ssim

    x = faces[0][:32]
    v = VeilTransform(face_model, key=KEY, steps=100, device="cpu")(x)
    assert float(np.mean(ssim(x, v))) < 0.1


# -- input types ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgb_model():
    torch.manual_seed(0)
    return LeNet5(3, 4)


def _veil_fast(model):
    return VeilTransform(model, key=KEY, steps=3, device="cpu")


def test_every_input_type_round_trips(faces, face_model, rgb_model):
    t1, t3 = _veil_fast(face_model), _veil_fast(rgb_model)
    x = faces[0][:3]  # uint8 [3, 1, 25, 25]
    ref = t1(x)
    # tensors: batch, single, float
    assert ref.dtype == torch.uint8 and ref.shape == x.shape
    assert torch.equal(t1(x[0]), ref[0])
    f = t1(x.float() / 255)
    assert f.dtype == torch.float32 and f.shape == x.shape and torch.equal((f * 255).round().to(torch.uint8), ref)
    # tv_tensors.Image keeps its type
    tv = t1(tv_tensors.Image(x[0]))
    assert isinstance(tv, tv_tensors.Image) and torch.equal(tv.as_subclass(torch.Tensor), ref[0])
    # numpy HW, HWC, BHWC
    a = x[0, 0].numpy()
    assert np.array_equal(t1(a), ref[0, 0].numpy())
    assert np.array_equal(t1(a[..., None]), ref[0].permute(1, 2, 0).numpy())
    assert np.array_equal(t1(x.permute(0, 2, 3, 1).numpy()), ref.permute(0, 2, 3, 1).numpy())
    # PIL grey and RGB
    out = t1(PIL.Image.fromarray(a))
    assert isinstance(out, PIL.Image.Image) and out.mode == "L" and np.array_equal(np.asarray(out), ref[0, 0].numpy())
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = t3(PIL.Image.fromarray(rgb))
    assert out.mode == "RGB" and out.size == (24, 20)
    assert np.array_equal(np.asarray(out), t3(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy())


def test_labels_and_other_entries_pass_through(faces, face_model):
    t = _veil_fast(face_model)
    img = faces[0][0]
    out = t({"image": tv_tensors.Image(img), "label": 3, "meta": {"id": "a"}, "mask": tv_tensors.Mask(img)})
    assert out["label"] == 3 and out["meta"] == {"id": "a"}
    assert torch.equal(out["mask"], img)  # masks are not veiled
    assert torch.equal(out["image"].as_subclass(torch.Tensor), t(img))
    im, lab = t((PIL.Image.fromarray(img[0].numpy()), 7))
    assert lab == 7 and isinstance(im, PIL.Image.Image)


def test_repr_shows_settings(face_model):
    r = repr(VeilTransform(face_model, p=0.4, steps=7, lr=0.2, layer="fc2", device="cpu"))
    for s in ("p=0.4", "steps=7", "lr=0.2", "layer='fc2'", "device='cpu'", "model='LeNet5'", "mode='paper'"):
        assert s in r, (s, r)


def test_pickles_and_copies(faces, face_model):
    t = _veil_fast(face_model)
    x = faces[0][:2]
    for t2 in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t)):
        assert torch.equal(t2(x), t(x))


def test_works_under_no_grad_and_leaves_the_model_alone(faces):
    m = LeNet5(1, 2).train()
    m.fc3.weight.requires_grad_(True)
    m.conv1.weight.requires_grad_(False)
    with torch.no_grad():
        v = VeilTransform(m, key=KEY, **FAST)(faces[0][:4])
    assert v.shape == (4, 1, 25, 25)
    assert m.training
    assert m.fc3.weight.requires_grad and not m.conv1.weight.requires_grad
    assert all(p.grad is None for p in m.parameters())


def test_the_callers_model_stays_on_its_device():
    m = LeNet5(1, 2)
    t = VeilTransform(m, key=KEY, device="meta")  # on a GPU host: device="cuda" (the default) for a CPU model
    assert m.conv1.weight.device.type == "cpu" and t.local_model.device.type == "meta"
    assert VeilTransform(m, key=KEY, device="cpu").local_model.module is m  # already there: used as it is


def test_a_model_that_cannot_be_copied_is_moved_with_a_warning():
    class WeightNormed(nn.Module):  # old-style weight_norm: its computed weight refuses deepcopy
        def __init__(self):
            super().__init__()
            with pytest.warns(FutureWarning):
                self.c = nn.utils.weight_norm(nn.Conv2d(1, 4, 3))

        def forward(self, x):
            return self.c(x).flatten(1)

    with pytest.warns(UserWarning, match="cannot be copied to meta .* moving it there in place"):
        t = VeilTransform(WeightNormed(), key=KEY, device="meta")
    assert t.local_model.device.type == "meta"


def test_works_under_inference_mode(faces, face_model):
    t = _veil_fast(face_model)
    want = t(faces[0][:3])
    with torch.inference_mode():  # Lightning's predict / validation loops
        got = t(faces[0][:3])
        inference_tensor = faces[0][:3].clone()
    assert torch.equal(got, want) and torch.equal(t(inference_tensor), want)


class _BNNet(nn.Module):
    """A BatchNorm net whose forward holds chosen threads at a gate, once each."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 23 * 23, 2)
        self.hold = {}  # thread -> (event: entered, event: go on)

    def forward(self, x):
        entered, go_on = self.hold.pop(threading.current_thread(), (None, None))
        if entered is not None:
            entered.set()
            go_on.wait(60)
        return self.fc(torch.relu(self.bn(self.c(x))).flatten(1))


def test_overlapping_veils_in_two_threads_leave_the_model_alone(faces):
    m = _BNNet().train()
    before = copy.deepcopy(m.state_dict())
    t = VeilTransform(m, key=KEY, steps=5, threshold=float("-inf"), lr=5.0, device="cpu")
    x = faces[0][:4]
    want = t(x)
    out, gates = {}, {}
    threads = {n: threading.Thread(target=lambda n=n: out.update({n: t(x)})) for n in "ab"}
    for n in "ab":  # a starts its veil, then b starts its own: both held inside F's forward
        gates[n] = (threading.Event(), threading.Event())
        m.hold[threads[n]] = gates[n]
        threads[n].start()
        assert gates[n][0].wait(60)
    gates["a"][1].set()  # a finishes first, while b's veil is still under way
    threads["a"].join(60)
    gates["b"][1].set()
    threads["b"].join(60)
    assert torch.equal(out["a"], want) and torch.equal(out["b"], want)  # b's veil ran in eval mode throughout
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # BatchNorm statistics untouched


def test_batchnorm_folding_runs_under_the_veils_freeze(faces, monkeypatch):
    """fold_batchnorm's own eval() / train() ran outside frozen(): a second thread's veil could be left
    in train mode (BatchNorm statistics updated) or F left in eval mode."""
    m = _BNNet().train()
    seen, real = [], F.fold_batchnorm

    def fold(model):  # F's mode as folding starts and as it ends
        seen.append(m.training)
        folded = real(model)
        seen.append(m.training)
        return folded

    monkeypatch.setattr(F, "fold_batchnorm", fold)
    VeilTransform(m, key=KEY, steps=2, device="cpu", fold_bn=True)(faces[0][:2])
    assert seen == [False, False] and m.training  # folded while frozen, and left so; restored after


def test_inner_layer_selection(faces, face_model):
    lm = LocalModel(face_model, layer="fc2")
    assert lm(F.normalize(faces[0][:3])).shape == (3, 84)
    v = VeilTransform(face_model, layer="fc2", key=KEY, **FAST)(faces[0][:3])
    assert v.shape == (3, 1, 25, 25)
    with pytest.raises(ValueError, match="not found; available: .*fc1"):
        LocalModel(face_model, layer="nope")


def test_load_torchscript(tmp_path, faces, face_model):
    path = tmp_path / "f.pt"
    torch.jit.trace(face_model, torch.zeros(1, 1, 25, 25)).save(str(path))
    t = VeilTransform(str(path), key=KEY, **FAST)
    assert torch.equal(t(faces[0][:2]), VeilTransform(face_model, key=KEY, **FAST)(faces[0][:2]))
    assert torch.equal(pickle.loads(pickle.dumps(t))(faces[0][:2]), t(faces[0][:2]))


# -- VeiledDataset ----------------------------------------------------------------------------
class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


class Counting(VeilTransform):
    calls = 0

    def veil_batch(self, images):
        type(self).calls += 1
        return super().veil_batch(images)


def test_veiled_dataset_veils_each_sample_once_in_batches(faces, face_model):
    x, y = faces[0][:20], faces[1][:20]
    veil = Counting(face_model, key=KEY, **FAST)
    Counting.calls = 0
    ds = VeiledDataset(Pairs(x, y), veil, batch_size=8)
    items = [ds[i] for i in range(20)] + [ds[i] for i in range(20)]
    assert Counting.calls == 3  # ceil(20 / 8) batches, each veiled once
    ref = VeilTransform(face_model, key=KEY, **FAST)(x)
    assert close_veils(torch.stack([im for im, _ in items[:20]]), ref)
    assert [lab for _, lab in items[:20]] == y.tolist()


def test_veiled_dataset_dict_samples_and_directory_cache(tmp_path, faces, face_model):
    x = faces[0][:10]
    data = [{"png": PIL.Image.fromarray(x[i, 0].numpy()), "cls": i % 2, "__key__": f"k{i}"} for i in range(10)]
    Counting.calls = 0
    ds = VeiledDataset(data, Counting(face_model, key=KEY, **FAST), batch_size=4, cache=tmp_path)
    first = [ds[i] for i in range(10)]
    assert all(isinstance(s["png"], PIL.Image.Image) and s["cls"] == i % 2 and s["__key__"] == f"k{i}" for i, s in enumerate(first))
    calls = Counting.calls
    ds2 = VeiledDataset(data, Counting(face_model, key=KEY, **FAST), batch_size=4, cache=tmp_path)
    second = [ds2[i] for i in range(10)]
    assert Counting.calls == calls  # read back from the directory, not veiled again
    assert all(np.array_equal(np.asarray(a["png"]), np.asarray(b["png"])) for a, b in zip(first, second))
    # another key uses another cache folder
    ds3 = VeiledDataset(data, Counting(face_model, key=b"\x09" * 32, **FAST), batch_size=4, cache=tmp_path)
    ds3[0]
    assert Counting.calls == calls + 1


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, x):
        self.x = x

    def __iter__(self):
        for i, im in enumerate(self.x):
            yield im, i


def test_veiled_iterable_dataset(faces, face_model):
    x = faces[0][:10]
    Counting.calls = 0
    ds = VeiledDataset(Stream(x), Counting(face_model, key=KEY, **FAST), batch_size=4)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    out = list(ds)
    assert [i for _, i in out] == list(range(10)) and Counting.calls == 3
    assert close_veils(torch.stack([v for v, _ in out]), VeilTransform(face_model, key=KEY, **FAST)(x))
    assert len(list(ds)) == 10 and Counting.calls == 3  # second epoch from the cache
    with pytest.raises(ValueError, match="empty"):
        list(VeiledDataset(Stream(x[:0]), Counting(face_model, key=KEY, **FAST)))


def test_dataloader_with_two_workers(faces, face_model):
    x, y = faces[0][:16], faces[1][:16]
    veil = VeilTransform(face_model, key=KEY, **FAST)
    ds = VeiledDataset(Pairs(x, y), veil, batch_size=8).prepare()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(ys), y)
    assert close_veils(torch.cat(xs), veil(x))

    class OnTheFly(Pairs):  # the transform itself, pickled into each worker
        def __getitem__(self, i):
            return veil(self.x[i]), int(self.y[i])

    xs2, _ = zip(*torch.utils.data.DataLoader(OnTheFly(x, y), batch_size=4, num_workers=2))
    assert close_veils(torch.cat(xs2), torch.cat(xs))


# -- bad input: clear errors before any work --------------------------------------------------
def test_bad_settings(face_model):
    for p in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="p must lie"):
            VeilTransform(face_model, p=p)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be"):
            VeilTransform(face_model, steps=steps)
    with pytest.raises(ValueError, match="mode must be one of"):
        VeilTransform(face_model, mode="nope")
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        VeilTransform(face_model, lr=0)
    with pytest.raises(ValueError, match="key"):
        VeilTransform(face_model, key=b"short")
    with pytest.raises(TypeError, match="nn.Module"):
        VeilTransform(object())


def test_bad_images(face_model):
    t = _veil_fast(face_model)
    with pytest.raises(ValueError, match=r"does not accept images of shape \[3, 25, 25\]"):
        t(torch.zeros(3, 25, 25, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"does not accept images of shape \[1, 4, 4\]"):
        t(torch.zeros(1, 4, 4, dtype=torch.uint8))
    bad = torch.full((1, 25, 25), 0.5)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        t(bad)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        t(torch.full((1, 25, 25), 200.0))
    with pytest.raises(TypeError, match="uint8 or float"):
        t(torch.zeros(1, 25, 25, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty batch"):
        t(torch.zeros(0, 1, 25, 25, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mode 'L', 'RGB' or 'RGBA'"):
        t(PIL.Image.new("CMYK", (25, 25)))


def test_model_output_must_be_logits():
    class Conv(nn.Module):
        def forward(self, x):
            return x * 2  # [B, C, H, W], not [B, n]

    with pytest.raises(ValueError, match=r"must return logits of shape \[B, n\]"):
        VeilTransform(Conv(), **FAST)(torch.zeros(1, 8, 8, dtype=torch.uint8))


def test_empty_dataset_and_bad_files(tmp_path, face_model):
    with pytest.raises(ValueError, match="empty"):
        VeiledDataset([], _veil_fast(face_model))
    with pytest.raises(FileNotFoundError):
        VeilTransform(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an onnx file")
    with pytest.raises(ValueError, match="ONNX model junk.onnx cannot be used"):
        VeilTransform(str(junk))
    notjit = tmp_path / "x.pt"
    notjit.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        VeilTransform(str(notjit))


def test_progress_into_a_log_is_a_line_now_and_then():
    """Under nohup or a batch system (stderr not a terminal) the bars were off: a 300k-image veil-shard run
    logged nothing for 9 minutes. Now a plain line every LOG_EVERY seconds, and a last one on close."""
    import io

    from veil_transforms import progress

    assert isinstance(progress.bar(total=10, desc="x"), progress.LogLines)  # pytest's stderr is no terminal
    out = io.StringIO()
    with progress.LogLines(total=300_000, desc="veiling", every=0.0, file=out) as pb:
        pb.update(12_000)
        pb.update(288_000)
    lines = out.getvalue().splitlines()
    first, last = lines[0], lines[-1]
    assert first.startswith("veiling: 12,000/300,000 img (4.0%) in ") and "img/s, about " in first, first
    assert last.startswith("veiling: 300,000/300,000 img (100.0%)") and last.endswith(" - done"), last
    quiet = io.StringIO()
    with progress.LogLines(total=5, every=60.0, file=quiet) as pb:
        pb.update(5)  # a short run writes nothing
    assert quiet.getvalue() == ""
    sizes = io.StringIO()
    with progress.LogLines(total=3 * 2**30, desc="checking", unit="B", unit_scale=True, every=0.0, file=sizes) as pb:
        pb.update(2**30)
    assert sizes.getvalue().startswith("checking: 1.07G/3.22G B (33.3%)"), sizes.getvalue()


# -- contracts a mutation review found no test for ----------------------------------------------
@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return LeNet5().eval()


def _digits(lo=0, n=2):
    return torch.randint(lo, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_denormalize_clamps_instead_of_wrapping():
    assert F.denormalize(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # a uint8 cast alone wraps 300 to 44


def test_the_distance_term_pushes_the_veil_away_from_the_original():
    """L = alpha |F(x~) - F(x)| - beta |x~ - x|: with an F that ignores its input only the distance term
    moves x~, and it must move it away from x."""
    class Const(nn.Module):
        def forward(self, z):
            return z.flatten(1)[:, :3] * 0 + 1.0

    g = torch.Generator().manual_seed(0)
    xn = torch.rand(4, 1, 9, 9, generator=g) * 2 - 1
    x0 = F.random_pixel_flip(xn, generator=g)
    xt = F.gradient_iteration(Const(), x0, xn, steps=5, lr=1.0, threshold=float("-inf"))
    assert ((xt - xn).flatten(1).norm(dim=1) > (x0 - xn).flatten(1).norm(dim=1)).all()


def test_veil_and_transform_flip_at_the_rate_p(lenet):
    """Bright images and a negligible step: the share of dark veil pixels is the flip rate p."""
    x = _digits(lo=140)
    for p in (0.2, 0.8):
        kw = dict(key=KEY, p=p, steps=1, lr=1e-6, threshold=float("-inf"))
        for v in (F.veil(lenet, x, **kw), VeilTransform(lenet, device="cpu", **kw)(x)):
            assert abs(float((v < 128).float().mean()) - p) < 0.03


def test_transform_veils_with_its_own_settings_and_output(lenet):
    x = _digits()
    kw = dict(key=KEY, p=0.3, alpha=0.9, beta=0.5, steps=3, lr=0.5, threshold=float("-inf"))
    assert torch.equal(VeilTransform(lenet, device="cpu", **kw)(x), F.veil(lenet, x, **kw))
    # float in: output="uint8" (the default) gives values on the 256-level grid, as PNGs store them;
    # output="float" the unrounded veil; and the input's float dtype is kept
    def off_grid(v):
        return float((v.double() * 255 - (v.double() * 255).round()).abs().max())

    v = F.veil(lenet, x.double() / 255, key=KEY, steps=2)
    assert v.dtype == torch.float64 and off_grid(v) < 1e-4  # k / 255 in float32, then cast
    assert off_grid(VeilTransform(lenet, key=KEY, steps=2, device="cpu", output="float")(x.float() / 255)) > 0.01


def test_float_pixels_outside_0_1_are_refused():
    for v in (-0.1, 1.01):
        with pytest.raises(ValueError, match="must lie in"):
            F.check_pixels(torch.full((1, 1, 4, 4), v))


def test_keyed_digests_keys_and_key_files(tmp_path):
    import hashlib
    import hmac
    import os
    import stat

    from veil_transforms import hardened as H

    a = torch.rand(1, 4, 4)
    assert keys.sample_digest(KEY, a) != keys.sample_digest(b"\x01" * 32, a)  # keyed: cache names leak nothing
    assert keys.sample_digest(KEY, a) != keys.sample_digest(KEY, a.reshape(1, 2, 8))  # the shape counts
    with pytest.raises(ValueError, match="at least 16"):
        keys.as_key(b"\x01" * 15)
    keys.read_key_file(tmp_path / "k", create=True)
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    # copy keys as documented (veils of other versions keep matching)
    assert H.copy_keys(KEY, 2) == [hmac.new(KEY, b"veil-hardened-copy" + i.to_bytes(4, "big"), hashlib.sha256).digest()
                                   for i in range(2)]


def test_model_problems_are_refused_and_the_layer_survives_pickling(lenet):
    class Mix(nn.Module):
        def forward(self, z):
            return z.flatten().unsqueeze(0)[:, :10]  # one row for the whole batch

    with pytest.raises(ValueError, match="mixes samples"):
        F.veil(Mix(), _digits(), key=KEY, steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        F.veil(lenet, _digits(), key=KEY, generator=torch.Generator(), steps=1)
    assert pickle.loads(pickle.dumps(LocalModel(lenet, layer="fc2"))).layer == "fc2"  # DataLoader workers


def test_a_state_dict_model_keeps_its_inner_layer_through_pickling(lenet, tmp_path):
    """LocalModel.load(state dict, layer, arch=...) pickles by its source file (DataLoader workers
    rebuild it from the bytes): the rebuilt copy must veil with the same inner layer, not F's output."""
    torch.save(lenet.state_dict(), tmp_path / "sd.pt")
    m = LocalModel.load(tmp_path / "sd.pt", "fc2", arch="lenet5")
    clone = pickle.loads(pickle.dumps(m))
    xn = F.normalize(_digits())
    assert clone.layer == "fc2" and clone.name == m.name == "lenet5:sd.pt" and clone.fingerprint() == m.fingerprint()
    assert clone(xn).shape == (2, 84) and torch.equal(clone(xn), m(xn))  # fc2's 84 features, not 10 logits
    vt = VeilTransform(m, key=KEY, steps=2, device="cpu")
    assert torch.equal(pickle.loads(pickle.dumps(vt))(_digits()), vt(_digits()))


def test_dataset_keeps_sample_types_copies_and_a_cache_folder_per_setting(lenet, tmp_path):
    import collections

    from veil_transforms.metrics import ssim

    x = _digits()
    S = collections.namedtuple("S", "img label")
    ds = VeiledDataset([S(x[0], 1), S(x[1], 0)], VeilTransform(lenet, key=KEY, steps=1, device="cpu"), progress=False)
    first = ds[0]
    assert isinstance(first, S) and ds[1].label == 0
    keyed = VeiledDataset([S(x[0], 1)], VeilTransform(lenet, key=KEY, steps=1, device="cpu"), image_key=0, progress=False)
    assert isinstance(keyed[0], S) and torch.equal(keyed[0].img, first.img)  # image_key= keeps the type too
    kept = first.img.clone()
    first.img.zero_()  # an in-place augmentation of the first access must not reach the memory cache
    assert torch.equal(ds[0].img, kept)
    assert isinstance(VeilTransform(lenet, key=KEY, steps=1, device="cpu")(tv_tensors.Image(x)), tv_tensors.Image)
    dirs = {VeiledDataset([x[0]], VeilTransform(lenet, key=KEY, device="cpu", **kw), cache=tmp_path, progress=False)._dir
            for kw in (dict(steps=1), dict(steps=3), dict(steps=1, precision="bf16"))}
    assert len(dirs) == 3  # another setting never reads the old veils
    with pytest.raises(ValueError):
        ssim(x, x[:1])  # the gate's SSIM never truncates a batch


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_a_tensor_batch_comes_back_in_its_own_memory_layout(rgb_model, dtype):
    """3+ channels are veiled channels-last: a contiguous [B, 3, H, W] batch came back channels-last, so
    out.view(B, -1), which worked on the input, raised. The veil now has the input's layout."""
    x = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = x if dtype == torch.uint8 else x.float() / 255
    out = F.veil(rgb_model, x, key=KEY, steps=1)
    assert out.dtype == dtype and out.is_contiguous() and out.view(2, -1).shape == (2, 3 * 28 * 28)
    assert VeilTransform(rgb_model, key=KEY, steps=1, device="cpu")(x).is_contiguous()
    cl = F.veil(rgb_model, x.contiguous(memory_format=torch.channels_last), key=KEY, steps=1)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)


def test_numpy_output_is_c_contiguous_channels_last_like_the_input(rgb_model):
    """A numpy image comes back as a C-contiguous array in the input's layout (HW, HWC, BHWC): a
    transposed view of the veil's CHW buffer has the right shape and values but not the memory layout
    that PIL, cv2 or a raw-buffer consumer read. (Veils of 3+ channels run channels-last and a size-1 axis
    does not count, so only the 2-channel images show a missing copy.)"""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for model, c in ((LeNet5(2, 2), 2), (rgb_model, 3), (LeNet5(1, 2), 1)):
        vt = VeilTransform(model, key=KEY, steps=1, device="cpu")
        bhwc = rng.integers(0, 256, (2, 28, 28, c), dtype=np.uint8)
        ref = vt(torch.from_numpy(bhwc).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous().numpy()
        cases = [(bhwc, ref), (bhwc[1], ref[1])] + ([(bhwc[0, ..., 0].copy(), ref[0, ..., 0])] if c == 1 else [])
        for a, want in cases:
            out = vt(a)
            assert out.shape == a.shape and out.dtype == a.dtype and np.array_equal(out, want)
            assert out.flags["C_CONTIGUOUS"], (a.shape, out.strides)
            assert np.array_equal(np.frombuffer(out, np.uint8), want.reshape(-1))  # as PIL.frombuffer reads it


def test_seeded_models_repeat_and_leave_the_callers_rng_alone():
    """training.seeded fixes a model's initial weights (fit seeds only the batch order: benchmarks that
    built F with a bare LeNet5() moved from run to run) without reseeding the caller's generator."""
    from veil_transforms.training import seeded

    state = torch.get_rng_state()
    a, b, c = seeded(LeNet5, 3), seeded(LeNet5, 3), seeded(LeNet5, 4)
    assert torch.equal(torch.get_rng_state(), state)
    sd = lambda m: torch.cat([p.flatten() for p in m.state_dict().values()])  # noqa: E731
    assert torch.equal(sd(a), sd(b)) and not torch.equal(sd(a), sd(c))
