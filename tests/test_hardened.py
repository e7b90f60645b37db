"""The "hardened" veil mode (veil_transforms/hardened.py): registration, per-sample independence,
determinism, the one-time-pad start, and privacy against the cheap keyless attacks on real faces."""

import math

import numpy as np
import pytest
import torch

from veil_transforms import VeilTransform
from veil_transforms import functional as VF
from veil_transforms import hardened as H
from veil_transforms.metrics import ssim
from veil_transforms.training import predict

KEY = bytes(range(32))


def test_registered():
    assert VF.MODES["hardened"] is H.hardened_iteration
    t = VeilTransform(torch.nn.Flatten(), mode="hardened", key=KEY, device="cpu")
    assert t.settings["mode"] == "hardened"


def test_batched_equals_one_at_a_time_and_repeatable(faces, face_model):
    x = faces[0][:12]
    a = VF.veil(face_model, x, key=KEY, mode="hardened")
    b = torch.cat([VF.veil(face_model, x[i : i + 1], key=KEY, mode="hardened") for i in range(len(x))])
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert (a.int() - b.int()).abs().max() <= 1  # float rounding in batch-size-dependent kernels only
    assert torch.equal(a, VF.veil(face_model, x, key=KEY, mode="hardened"))  # bit-identical on a repeat
    other = VF.veil(face_model, x, key=bytes(range(1, 33)), mode="hardened")
    assert (other.int() - a.int()).abs().float().mean() > 40  # another key: an unrelated veil


def test_pad_is_per_sample_and_independent_of_the_image(faces):
    xn = VF.normalize(faces[0][:32])
    x0 = VF.random_pixel_flip(xn, uniform=VF.keyed_uniforms(KEY, xn))
    pad = H.one_time_pad(x0, xn)
    assert torch.equal(pad[5:6], H.one_time_pad(x0[5:6], xn[5:6]))
    assert pad.min() >= -1 and pad.max() < 1
    # uniform on [-1, 1): mean 0, variance 1/3, and uncorrelated with the image, pixel by pixel
    assert abs(float(pad.mean())) < 0.02 and abs(float(pad.var()) - 1 / 3) < 0.02
    corr = np.corrcoef(pad.flatten().numpy(), xn.flatten().numpy())[0, 1]
    assert abs(corr) < 0.03
    fold_corr = np.corrcoef(pad.abs().flatten().numpy(), xn.abs().flatten().numpy())[0, 1]
    assert abs(fold_corr) < 0.03  # the paper's start has |x0| = |x| exactly


def test_update_never_sees_the_pixels():
    """With an F that ignores its input, x~ is the pad: x enters only through F(x) (beta is unused)."""

    class Const(torch.nn.Module):
        def forward(self, z):
            return z.flatten(1)[:, :3] * 0 + 1.0

    g = torch.Generator().manual_seed(0)
    xn = torch.rand(4, 1, 9, 9, generator=g) * 2 - 1
    x0 = VF.random_pixel_flip(xn, generator=g)
    for beta in (0.0, 0.001, 10.0):
        out = H.hardened_iteration(Const(), x0, xn, beta=beta, steps=5, threshold=-math.inf)
        assert torch.equal(out, H.one_time_pad(x0, xn))


def test_stats_and_early_stop(faces, face_model):
    xn = VF.normalize(faces[0][:8])
    x0 = VF.random_pixel_flip(xn, uniform=VF.keyed_uniforms(KEY, xn))
    _, st = H.hardened_iteration(face_model, x0, xn, steps=7, threshold=-math.inf, return_stats=True)
    assert st["steps"].tolist() == [7] * 8
    _, st = H.hardened_iteration(face_model, x0, xn, steps=300, threshold=math.inf, return_stats=True)
    assert st["steps"].tolist() == [1] * 8


def test_fold_and_cheap_attacks_fail_on_real_faces(faces, face_model):
    """64 real LFW crops: the fold shows nothing, the veil keeps F's decision, every cheap attack stays low."""
    from veil_transforms import audit

    x = faces[0][:64]
    v = VF.veil(face_model, x, key=KEY, mode="hardened", threshold=0.0, steps=100)
    fold = lambda t: VF.denormalize(VF.normalize(t).abs() * 2 - 1)  # noqa: E731
    assert ssim(fold(v), fold(x)).mean() < 0.1
    assert ssim(v, x).mean() < 0.05
    paper = VF.veil(face_model, x, key=KEY, threshold=0.0, steps=100)
    assert ssim(fold(paper), fold(x)).mean() > 0.3  # the weakness the mode removes
    agree = (predict(face_model, v) == predict(face_model, x)).float().mean()
    assert agree >= 0.9
    report = audit.run(x, v, reid_gallery=0)
    assert report.max_mean_ssim < 0.15, report.summary()


def test_noise_augment():
    aug = H.noise_augment(0.5)
    xb = torch.zeros(1000, 1, 4, 4)
    out = aug(xb, torch.Generator().manual_seed(0))
    assert abs(float(out.std()) - 0.5) < 0.02
    for bad in (-1, True, float("nan")):  # (True read as sigma 1)
        with pytest.raises(ValueError, match="sigma must be"):
            H.noise_augment(bad)


def test_copy_keys():
    ks = H.copy_keys(KEY, 4)
    assert len(set(ks)) == 4 and all(len(k) == 32 for k in ks)
    assert H.copy_keys(KEY, 2) == ks[:2]
    with pytest.raises(ValueError):
        H.copy_keys(KEY, 0)


def test_pad_derived_ahead_gives_the_same_veil(faces, face_model):
    """veil-shard's I/O workers derive the pad (as much SHAKE hashing as the mask) off the GPU
    thread, from the key's uniforms alone: the same pad bits, the same veil, bit for bit."""
    from veil_transforms import keys

    x, key = faces[0][:24], b"\x05" * 32
    xn = VF.normalize(x)
    u = VF.keyed_uniforms(key, xn)
    x0 = VF.random_pixel_flip(xn, 0.5, uniform=u)
    pad = keys.pad_uniforms_np(((u < 0.5) & (xn != 0)).numpy())
    assert np.array_equal(pad, H.pad_uniforms(x0, xn).numpy())
    assert not np.array_equal(pad, keys.pad_uniforms_np((u < 0.4).numpy()))  # the bits matter
    kw = dict(key=key, mode="hardened", steps=15, device="cpu", chunk=10)  # chunks slice the pad too
    ref = VF.veil(face_model, x, **kw)
    assert torch.equal(VF.veil(face_model, x, uniforms=u, pad_uniforms=torch.from_numpy(pad), **kw), ref)
    with pytest.raises(ValueError, match="with uniforms="):
        VF.veil(face_model, x, pad_uniforms=torch.from_numpy(pad), **kw)
    with pytest.raises(ValueError, match="the hardened mode's pad; mode 'paper' takes none"):
        VF.veil(face_model, x, key=key, uniforms=u, pad_uniforms=torch.from_numpy(pad), steps=2, device="cpu")
    # a pad of integers or zeros starts the veil from x itself (SSIM 0.99 to the original): refused
    t = torch.from_numpy(pad)
    last_wrong = t.clone()
    last_wrong[-1] = torch.from_numpy(keys.pad_uniforms_np(((u[-1:] < 0.4) & (xn[-1:] != 0)).numpy()))[0]
    for bad in (torch.zeros_like(t), (t * 255).to(torch.uint8), t.round(), t.half(), t.double(), t + 1, -t,
                torch.full_like(t, float("nan")), pad, torch.from_numpy(keys.pad_uniforms_np((u < 0.4).numpy())),
                last_wrong):
        with pytest.raises(ValueError, match="pad_uniforms="):
            VF.veil(face_model, x, uniforms=u, pad_uniforms=bad, **kw)
    with pytest.raises(TypeError, match="pad: expected a tensor"):
        H.hardened_iteration(face_model, x0, xn, steps=1, pad=pad)


def test_a_p_whose_flip_bits_could_be_guessed_is_refused(tmp_path):
    """The pad is derived from the flip bits alone, so at p far from 0.5 it is nearly a constant: a
    red-team run recovered LFW faces from such veils (SSIM 0.65 at p = 1e-6, and 5 of 8 faces at 0.90+ at
    p = 0.002 by trying every pattern of <= 2 flips), and veil-export's gate passed them. Refused unless a
    sample's bits carry MIN_PAD_BITS of secret; veil-shard refuses before making OUT."""
    from veil_transforms.nets import LeNet5
    from veil_transforms.tools import shard as shard_cli
    import PIL.Image

    torch.manual_seed(0)
    m = LeNet5()
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for p in (1e-6, 0.002, 0.999999):
        with pytest.raises(ValueError, match=r"carry \d+\.\d bits of secret, fewer than 80"):
            VF.veil(m, x, key=KEY, p=p, mode="hardened", steps=1)
    assert H.pad_secret_bits(0.1, 784) > H.MIN_PAD_BITS  # 119 bits: accepted
    VF.veil(m, x, key=KEY, p=0.1, mode="hardened", steps=1)
    VF.veil(m, x, key=KEY, p=0.002, mode="paper", steps=1)  # no pad in the paper mode: its own business
    # mid-grey pixels (0.5 exactly, normalized to 0) carry no bit: a nearly flat float image is refused
    flat = torch.full((1, 1, 28, 28), 0.5)
    flat[0, 0, 0, :20] = 0.0
    with pytest.raises(ValueError, match=r"sample 0 \(20 of its 784 values not exactly mid-grey\) carry 20.0 bits"):
        VF.veil(m, flat, key=KEY, mode="hardened", steps=1)
    with pytest.raises(ValueError, match=r"sample 1 \(20 of"):  # the batch's poorest sample, not its first
        VF.veil(m, torch.cat([x[:1].float() / 255, flat]), key=KEY, mode="hardened", steps=1)
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for i in range(3):
        PIL.Image.fromarray(x[i % 2, 0].numpy()).save(src / f"{i}.png")
    torch.jit.script(m).save(str(tmp_path / "m.pt"))
    argv = [str(tmp_path / "src"), str(tmp_path / "out"), "--model", str(tmp_path / "m.pt"), "--mode", "hardened",
            "--steps", "1", "--quiet", "--key-file", str(tmp_path / "k")]
    assert shard_cli.main([*argv, "--p", "0.001"]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "k").exists()


# -- contracts a mutation review found no test for ----------------------------------------------
def test_mid_grey_pixels_carry_no_flip_bit():
    """``flip_mask`` reads False where ``x == 0`` (mid-grey: a flip changes nothing there), as veil-shard's
    I/O workers assume when they derive the pad ahead from ``(u < p) & (x != 0)``: a pixel at 0 read as
    flipped (``<= 0``) gave the hardened veil another pad than the one derived ahead. The faces of the
    other tests are uint8, which never normalize to exactly 0."""
    from veil_transforms import keys

    g = torch.Generator().manual_seed(0)
    xn = torch.rand(3, 1, 12, 12, generator=g) * 2 - 1
    xn[:, :, ::3] = 0.0  # every third row mid-grey
    u = VF.keyed_uniforms(KEY, xn)
    x0 = VF.random_pixel_flip(xn, 0.5, uniform=u)
    m = H.flip_mask(x0, xn)
    assert not m[xn == 0].any() and m[xn != 0].any()
    assert torch.equal(m, (u < 0.5) & (xn != 0))
    assert np.array_equal(H.pad_uniforms(x0, xn).numpy(), keys.pad_uniforms_np(((u < 0.5) & (xn != 0)).numpy()))


def test_a_pad_of_exactly_min_pad_bits_is_accepted():
    """Refused below MIN_PAD_BITS ("fewer than 80"), so exactly 80 bits (80 pixels at p = 0.5) passes."""
    x = torch.zeros(2, 1, 10, 10)
    x[:, 0].view(2, -1)[:, : H.MIN_PAD_BITS] = 0.5
    assert H.pad_secret_bits(0.5, H.MIN_PAD_BITS) == H.MIN_PAD_BITS
    H.check_pad_secret(0.5, x)
    x[1, 0, 0, 0] = 0.0  # 79 values not mid-grey in sample 1
    with pytest.raises(ValueError, match=r"sample 1 \(79 of its 100 values not exactly mid-grey\) carry 79.0 bits"):
        H.check_pad_secret(0.5, x)
