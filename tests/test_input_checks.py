"""Bad input to the library gets a clear error, never a silent pass-through, a black image or a raw
torch traceback; and a directory cache is read one file per sample."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset
from torchvision import tv_tensors

import veil_transforms.dataset as dataset_mod
from veil_transforms import VeiledDataset, VeilTransform
from veil_transforms import functional as F
from veil_transforms.model import LocalModel
from veil_transforms.nets import LeNet5

KEY = b"k" * 32


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return LeNet5()


@pytest.fixture(scope="module")
def vt(lenet):
    return VeilTransform(lenet, steps=2, key=KEY, device="cpu")


def u8(n=2, c=1, s=28, seed=0):
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- VeilTransform: nothing unveiled gets through ---------------------------------------------------
@pytest.mark.parametrize("inpt", [np.zeros(784, np.uint8), np.zeros((1, 1, 28, 28, 1), np.uint8), {"label": 3}, "x"])
def test_transform_refuses_input_without_an_image(vt, inpt):
    # v2 passes types it does not transform through unchanged: for a veil that hands on the raw image
    with pytest.raises(TypeError, match="no image to veil"):
        vt(inpt)


def test_numpy_image_with_a_tensor_label(vt):
    img = np.arange(784, dtype=np.uint8).reshape(28, 28)
    out, label = vt((img, torch.tensor(3)))
    assert isinstance(out, np.ndarray) and out.shape == (28, 28) and not np.array_equal(out, img)
    assert torch.equal(label, torch.tensor(3))  # the label is not mistaken for the image


@pytest.mark.parametrize("sample", [
    lambda a, b: [a, b],  # a list of images: torchvision's rule veils only the first
    lambda a, b: (a, b),  # a Siamese / contrastive pair
    lambda a, b: (a, (b[0].numpy() > 128).astype(np.uint8)),  # a numpy mask beside a tensor image
    lambda a, b: {"image": a, "mask": b[0].numpy()},
])
def test_sample_with_several_unmarked_images_is_refused_not_half_veiled(vt, sample):
    a, b = u8(1, seed=1)[0], u8(1, seed=2)[0]
    with pytest.raises(TypeError, match="cannot tell which of these are images"):
        vt(sample(a, b))


def test_detection_and_segmentation_targets_pass_through(vt):
    """Plain tensors F does not take as images (masks [N, H, W], keypoints, heatmaps, padded boxes) are
    targets, not second images: torchvision's detection samples keep working."""
    a = u8(1, seed=1)[0]
    target = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]]), "labels": torch.tensor([3]),
              "masks": torch.zeros(2, 28, 28, dtype=torch.uint8), "keypoints": torch.zeros(2, 5, 3),
              "heatmaps": torch.zeros(4, 28, 28)}
    img, out = vt((a, target))
    assert torch.equal(img, vt(a)) and all(torch.equal(out[k], v) for k, v in target.items())
    batch, boxes = vt((u8(2), torch.zeros(2, 3, 4)))  # a batch with padded boxes
    assert torch.equal(batch, vt(u8(2))) and not boxes.any()
    img, plain = vt((tv_tensors.Image(a), u8(1, seed=2)[0]))  # torchvision's rule beside a marked image
    assert torch.equal(plain, u8(1, seed=2)[0])


def test_a_plain_image_beside_a_marked_one_passes_with_one_warning(lenet, caplog):
    """torchvision's rule hands a plain tensor beside a tv_tensors.Image on as it is: a pair dataset that
    marks only its first image leaks the second; one warning when that tensor has F's image shape (a
    helper's review). A target of another shape says nothing."""
    v = VeilTransform(lenet, steps=2, key=KEY, device="cpu")
    a, b = u8(1, seed=1)[0], u8(1, seed=2)[0]
    with caplog.at_level("WARNING", logger="veil_transforms"):
        v((tv_tensors.Image(a), torch.zeros(2, 28, 28)))  # a mask-like target of another shape
        assert not caplog.records
        for _ in range(3):
            _, plain = v((tv_tensors.Image(a), b))
            assert torch.equal(plain, b)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "passes through unveiled" in msgs[0], msgs


def test_every_marked_image_of_a_sample_is_veiled(vt):
    a, b = u8(1, seed=1)[0], u8(1, seed=2)[0]
    va, vb, mask, label = vt((tv_tensors.Image(a), tv_tensors.Image(b), tv_tensors.Mask(b), 7))
    assert torch.equal(va.as_subclass(torch.Tensor), vt(a)) and torch.equal(vb.as_subclass(torch.Tensor), vt(b))
    assert torch.equal(mask, b) and label == 7
    pils = vt([PIL.Image.fromarray(a[0].numpy()), PIL.Image.fromarray(b[0].numpy())])
    assert [np.asarray(p).tolist() for p in pils] == [vt(a)[0].tolist(), vt(b)[0].tolist()]


def test_video_is_refused_not_passed_through(vt):
    with pytest.raises(TypeError, match="does not veil tv_tensors.Video"):
        vt(tv_tensors.Video(u8(2)))


def test_numpy_scalars_are_accepted_as_settings(lenet):
    x = u8(2)
    want = VeilTransform(lenet, steps=3, p=0.5, lr=float(np.float32(0.2)), key=KEY, device="cpu")(x)
    got = VeilTransform(lenet, steps=np.int64(3), p=np.float32(0.5), lr=np.float32(0.2), key=KEY, device="cpu")(x)
    assert torch.equal(got, want)  # e.g. values read from a numpy config or a sweep grid
    assert torch.equal(F.veil(lenet, x, key=KEY, steps=np.int32(3), lr=np.float32(0.2), chunk=np.int64(1)), want)
    assert VeiledDataset(_Images(), VeilTransform(lenet, key=KEY), batch_size=np.int64(8)).batch_size == 8
    with pytest.raises(ValueError, match="steps must be an integer"):
        VeilTransform(lenet, steps=np.bool_(True))


@pytest.mark.parametrize("shape", [(1, 28, 28), (5, 28, 28)])  # channels first, a batch of grey images
def test_numpy_array_in_another_layout_gets_the_layout_named(vt, shape):
    with pytest.raises(ValueError, match=r"read channels last: this one, of shape \(\d, 28, 28\), as H, W, C"):
        vt(np.zeros(shape, np.uint8))


def test_empty_numpy_batch(vt):
    with pytest.raises(ValueError, match="empty batch"):
        vt(np.zeros((0, 28, 28, 1), np.uint8))


# -- functional.veil checks what VeilTransform checks ------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(key=b"x"), "at least 16 bytes"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(lr=-1.0), "lr must be a finite number > 0"),
    (dict(alpha=-1.0), "alpha must be a finite number > 0"),
    (dict(beta=-0.1), "beta must be a finite number >= 0"),
    (dict(threshold=float("nan")), "threshold must be a number"),
    (dict(chunk=0), "chunk must be an integer >= 1"),
    (dict(chunk="big"), "chunk must be an integer >= 1"),
    (dict(uniforms=torch.full((2, 1, 28, 28), float("nan"))), "uniforms= must be a float32 tensor"),
    (dict(device="gpu"), "not a torch device"),
    (dict(p="0.5"), r"p must lie in the open interval \(0, 1\), got '0.5'"),  # a str from a config file
    (dict(p=True), "p must lie in the open interval"),
    (dict(p=1.0), "p must lie in the open interval"),
    (dict(output="png"), "output must be 'uint8' or 'float'"),
    (dict(mode="strong"), "mode must be one of"),
])
def test_veil_rejects_bad_settings(lenet, kw, match):
    kw = {"key": KEY, **kw}
    with pytest.raises(ValueError, match=match):
        F.veil(lenet, u8(), steps=2, **kw)


def test_veil_accepts_a_hex_key_as_the_same_key(lenet):
    assert torch.equal(F.veil(lenet, u8(), steps=2, key=KEY.hex()), F.veil(lenet, u8(), steps=2, key=KEY))


def test_veil_rejects_non_tensor(lenet):
    with pytest.raises(TypeError, match="expected a tensor, got list"):
        F.veil(lenet, [1, 2], steps=2, key=KEY)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu(lenet):
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        VeilTransform(lenet, device="cuda")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        F.veil(lenet, u8(), steps=2, key=KEY, device="cuda")


def test_transform_rejects_negative_weights(lenet):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        VeilTransform(lenet, alpha=-1.0)


class _Lin(nn.Module):
    def __init__(self, post):
        super().__init__()
        self.fc, self.post = nn.Linear(784, 10), post

    def forward(self, x):
        return self.post(self.fc(x.flatten(1)))


def test_nan_output_is_an_error_not_a_black_image():
    with pytest.raises(ValueError, match="NaN or inf"):
        F.veil(_Lin(lambda y: y * float("nan")), u8(), steps=2, key=KEY)


@pytest.mark.parametrize("mode", ["paper", "hardened"])
@pytest.mark.parametrize("post", [lambda y: y.detach(), lambda y: y.round().long()], ids=["detached", "integer"])
def test_model_without_input_gradient_is_refused(mode, post):
    with pytest.raises(ValueError, match="does not depend differentiably on its input"):
        VeilTransform(_Lin(post), steps=2, key=KEY, device="cpu", mode=mode)(u8()[0])


@pytest.mark.parametrize("post", [lambda y: y.detach(), lambda y: (y, y), lambda y: {"logits": y}, lambda y: y.sum()],
                         ids=["detached", "tuple", "dict", "scalar"])
def test_veil_function_checks_the_model_as_the_transform_does(post):
    """functional.veil() ran a detached F (a linear probe on a no_grad backbone) on the pixel term alone,
    byte-identical to an F that outputs zeros, and gave raw AttributeError/IndexError for tuple, dict and
    scalar outputs: it now refuses them with VeilTransform's messages."""
    with pytest.raises(ValueError, match="local model _Lin"):
        F.veil(_Lin(post), u8(), steps=2, key=KEY)


@pytest.mark.parametrize("post,hint", [(lambda y: (y.sum(1), y), r"a tuple of 2.*return model\(x\)\[0\]"),
                                       (lambda y: [None, y], r"a list of 2.*return model\(x\)\[1\]"),
                                       (lambda y: {"loss": None, "logits": y}, r"keys \['loss', 'logits'\].*"
                                                                               r"return model\(x\)\['logits'\]")],
                         ids=["tuple", "list", "dict"])
def test_a_model_returning_a_container_is_told_how_to_pick_its_logits(post, hint):
    """A model that returns (logits, aux) or a dict (Hugging Face style) got "must return a tensor, got
    tuple": the message now names what it returned and the line of a wrapper that picks the tensor."""
    with pytest.raises(ValueError, match=hint):
        VeilTransform(_Lin(post), steps=2, key=KEY, device="cpu")(u8()[0])


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return nn.functional.dropout(self.fc(x.flatten(1)), 0.5, training=True)  # as a trace in train mode keeps it


def test_a_model_that_is_random_in_eval_mode_is_refused():
    """A TorchScript traced in train mode keeps its dropout: the same key gave a new veil each call
    (92% of pixels differed), silently."""
    with pytest.raises(ValueError, match="gives different outputs for the same image"):
        F.veil(_Dropout(), u8(), steps=2, key=KEY)
    with pytest.raises(ValueError, match="gives different outputs for the same image"):
        VeilTransform(torch.jit.trace(_Dropout(), torch.zeros(2, 1, 28, 28)), steps=2, key=KEY, device="cpu")(u8()[0])


def test_half_precision_weights_get_advice_not_a_dtype_error(lenet):
    m = copy.deepcopy(lenet).half()
    with pytest.raises(ValueError, match=r"torch.float16 weights.*model.float\(\)"):
        VeilTransform(m, steps=2, key=KEY, device="cpu")(u8()[0])
    with pytest.raises(ValueError, match="torch.float16 weights"):
        F.veil(m, u8(), steps=2, key=KEY)
    F.veil(m.float(), u8(), steps=2, key=KEY)  # mended in place: a refusal is not remembered
    with pytest.raises(ValueError, match=r"torch.float64 weights.*model.float\(\)"):  # was a raw dtype error
        VeilTransform(copy.deepcopy(lenet).double(), steps=2, key=KEY, device="cpu")(u8()[0])


def test_common_input_mistakes_name_their_fix(vt):
    from torchvision.transforms import v2

    with pytest.raises(ValueError, match=r"\[H, W\] add a channel axis"):  # webdataset's "torchl" decoding
        vt(u8()[0, 0])
    normalized = v2.Normalize([0.5], [0.5])(u8()[0].float() / 255)
    with pytest.raises(ValueError, match="put the veil before Normalize"):
        vt(normalized)


def test_the_input_is_not_a_layer():
    """layer='x' (the input placeholder, listed by torch.fx) made F(x~) = x~: the veil pulled x~ back onto
    x, 3 grey levels from the original on average. It is not listed, and refused."""
    m = LeNet5()
    assert "x" not in LocalModel.layers(m) and "fc2" in LocalModel.layers(m)
    with pytest.raises(ValueError, match="is F's input"):
        VeilTransform(m, layer="x", steps=2, key=KEY, device="cpu")


class _Sizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        n = x.size(0)
        return self.fc(x.reshape(n, -1))


def test_a_layer_that_is_not_a_tensor_is_named():
    with pytest.raises(ValueError, match="layer 'size' of _Sizes gives a int, not a tensor"):
        VeilTransform(_Sizes(), layer="size", steps=2, key=KEY, device="cpu")(u8()[0])


def test_caller_models_submodule_modes_are_restored(lenet):
    """A model training with a frozen BatchNorm (m.train(); m.bn.eval()) came back with the BatchNorm in
    train mode, so the next training step updated its running statistics."""
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    m(torch.zeros(2, 1, 28, 28))
    m.train()
    m[1].eval()
    F.veil(m, u8(), steps=2, key=KEY)
    VeilTransform(m, steps=2, key=KEY, device="cpu")(u8()[0])
    assert m.training and not m[1].training and m[4].training


def test_cache_tells_models_with_the_same_weights_but_other_code_apart(tmp_path):
    """Two Sequentials with the same parameters, a ReLU and a Tanh between them, shared one cache folder:
    the Tanh model was handed the ReLU model's veils."""
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    tanh = copy.deepcopy(relu)
    tanh[2] = nn.Tanh()
    assert LocalModel(relu).fingerprint() != LocalModel(tanh).fingerprint()
    assert LocalModel(relu).fingerprint() == LocalModel(copy.deepcopy(relu)).fingerprint()
    # scripted: every scripted submodule is one class (RecursiveScriptModule), so each one's code counts
    class ActA(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    class ActB(nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    for c in (ActA, ActB):
        c.__name__ = c.__qualname__ = "Act"  # the same name in the scripted repr
    a, b = copy.deepcopy(relu), copy.deepcopy(relu)
    a[2], b[2] = ActA(), ActB()
    sa, sb = torch.jit.script(a), torch.jit.script(b)
    assert repr(sa) == repr(sb)
    assert LocalModel(sa).fingerprint() != LocalModel(sb).fingerprint()


# -- LocalModel.load: the cause, in one line ------------------------------------------------------------
def test_load_state_dict_errors(tmp_path, lenet):
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt is not a state dict"):
        LocalModel.load(text, arch="lenet5")
    whole = tmp_path / "whole.pt"
    torch.save(lenet, whole)  # the module object, not its state dict
    with pytest.raises(ValueError, match="whole.pt holds pickled Python objects.*state_dict"):
        LocalModel.load(whole, arch="lenet5")
    sd = tmp_path / "lenet_sd.pt"
    torch.save(lenet.state_dict(), sd)
    with pytest.raises(ValueError, match=r"does not fit architecture 'resnet18': Missing key\(s\) in state_dict: "
                       r"\"\w+\.\w+\" and \d+ more$"):
        LocalModel.load(sd, arch="resnet18")


def test_load_names_common_mistakes(tmp_path, lenet):
    """A whole pickled module without arch= was told 'not a TorchScript file'; {'model': sd} and 'module.'
    (DataParallel) checkpoints reported only missing keys; a meta-device model gave torch's raw error."""
    whole = tmp_path / "whole.pt"
    torch.save(lenet, whole)
    with pytest.raises(ValueError, match=r"whole.pt holds a pickled Python module \(torch.save\(model\)\)"):
        LocalModel.load(whole)
    x = u8()
    for name, ckpt in (("wrapped", {"model": lenet.state_dict(), "epoch": 3}),
                       ("ddp", {f"module.{k}": v for k, v in lenet.state_dict().items()})):
        torch.save(ckpt, tmp_path / f"{name}.pt")
        m = LocalModel.load(tmp_path / f"{name}.pt", arch="lenet5")
        assert torch.equal(m(F.normalize(x)), lenet(F.normalize(x)))
    with torch.device("meta"):
        meta = LeNet5()
    with pytest.raises(ValueError, match="weights on the meta device"):
        VeilTransform(meta, steps=2, key=KEY, device="cpu")(x[0])
    # LocalModel("local.pt") was told "expected an nn.Module, LocalModel or path", and load() dropped options
    # meant for ONNX files silently (a helper's review)
    with pytest.raises(TypeError, match=r"got PosixPath; for a model file use LocalModel.load\(path\)"):
        LocalModel(tmp_path / "ddp.pt")
    with pytest.raises(TypeError, match="check is an option of ONNX files, and ddp.pt is not one"):
        LocalModel.load(tmp_path / "ddp.pt", arch="lenet5", check=False)


def test_torchscript_shape_error_names_the_cause(tmp_path, lenet):
    path = tmp_path / "lenet.pt"
    torch.jit.script(lenet).save(str(path))
    m = LocalModel.load(path)
    with pytest.raises(ValueError, match="expected input.*to have 1 channels, but got 3") as e:
        m.check_input((3, 28, 28))
    assert "\n" not in str(e.value)


# -- VeiledDataset ---------------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __init__(self, n=40):
        self.x = u8(n, seed=1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 10


class _Pairs(torch.utils.data.Dataset):
    """Samples of two images (and a label), built by ``make(a, b, label)``."""

    def __init__(self, make, n=4):
        self.x, self.make = u8(2 * n, seed=3), make

    def __len__(self):
        return len(self.x) // 2

    def __getitem__(self, i):
        return self.make(self.x[2 * i], self.x[2 * i + 1], i)


@pytest.mark.parametrize("make", [
    lambda a, b, y: (tv_tensors.Image(a), tv_tensors.Image(b), y),
    lambda a, b, y: {"image": PIL.Image.fromarray(a[0].numpy()), "image2": PIL.Image.fromarray(b[0].numpy()), "y": y},
    lambda a, b, y: [{"left": tv_tensors.Image(a)}, ({"right": tv_tensors.Image(b)}, y)],
], ids=["tuple", "dict", "nested"])
def test_dataset_veils_every_image_of_a_sample(vt, make):
    """It veiled the first image of a sample and handed the second on as it was."""
    data = _Pairs(make)
    ds = VeiledDataset(data, vt, batch_size=3, progress=False)
    for i in range(len(data)):
        got, (a, b) = ds[i], (data.x[2 * i], data.x[2 * i + 1])
        leaves = torch.utils._pytree.tree_leaves(got)
        images = [v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))[None]
                  for v in leaves if not isinstance(v, int)]
        assert [torch.equal(v, vt(x)) for v, x in zip(images, (a, b))] == [True, True]
        assert type(got) is type(data[i]) and [v for v in leaves if isinstance(v, int)] == [i]


def test_dataset_refuses_two_unmarked_images_and_takes_image_key(vt):
    data = _Pairs(lambda a, b, y: (a, b, y))
    with pytest.raises(TypeError, match="cannot tell which.*image_key="):
        VeiledDataset(data, vt, progress=False)[0]
    one = VeiledDataset(data, vt, image_key=1, progress=False)[0]  # the owner's choice: veil b, hand on a
    assert torch.equal(one[0], data.x[0]) and torch.equal(one[1], vt(data.x[1])) and one[2] == 0
    with pytest.raises(TypeError, match="image_key=5 is not in the sample"):
        VeiledDataset(data, vt, image_key=5, progress=False)[0]
    label_first = VeiledDataset(_Pairs(lambda a, b, y: (y, a)), vt, progress=False)[1]  # no image_key needed
    assert label_first[0] == 1 and torch.equal(label_first[1], vt(data.x[2]))


class _Flipping(torch.utils.data.Dataset):
    """A detection-style sample whose image and box flip together at random, as v2.RandomHorizontalFlip does."""

    def __init__(self):
        self.x, self.g = u8(4, seed=5), torch.Generator().manual_seed(0)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        flip = bool(torch.rand(1, generator=self.g) < 0.5)
        return (self.x[i].flip(-1) if flip else self.x[i]), {"flipped": flip}


def test_memory_cache_never_pairs_an_old_veil_with_new_targets(vt, caplog):
    """The memory cache was keyed by index alone: a random transform in the wrapped dataset got its first
    draw's veil back beside later draws' targets (boxes on the wrong side)."""
    data = _Flipping()
    ds = VeiledDataset(data, vt, batch_size=4, progress=False)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        for _ in range(6):
            for i in range(len(data)):
                got, target = ds[i]
                want = data.x[i].flip(-1) if target["flipped"] else data.x[i]
                assert torch.equal(got, vt(want)), (i, target)
    assert [r.getMessage().count("another image") for r in caplog.records] == [1]
    assert len(ds._memory) == len(data)  # one veil held per image slot, not one per draw


def test_a_worker_veiling_into_the_memory_cache_warns_once(vt, caplog, monkeypatch):
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    ds = VeiledDataset(_Images(), vt, batch_size=16, progress=False)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        ds[0], ds[1], ds[20]
    assert [r.getMessage().count("call prepare()") for r in caplog.records] == [1]
    prepared = VeiledDataset(_Images(), vt, batch_size=16, progress=False)
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: None)
    prepared.prepare()
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: object())
    caplog.clear()
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        prepared[0], prepared[20]
    assert caplog.records == []  # prepared: the worker only reads


def test_cache_folder_with_a_tilde_is_the_home_folder(vt, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    ds = VeiledDataset(_Images(), vt, cache="~/veil-cache", progress=False)
    assert ds._dir.parent == tmp_path / "veil-cache" and not (tmp_path / "~").exists()


def test_in_memory_torchscript_model_pickles_for_spawned_workers(lenet, tmp_path):
    import pickle
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(lenet.eval())
    vt = VeilTransform(scripted, steps=2, key=KEY, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor torch's "torch.jit.save is deprecated" in every worker
        worker_vt = pickle.loads(pickle.dumps(vt))
    x = u8(2)
    assert torch.equal(worker_vt(x), vt(x))
    ds = VeiledDataset(_Images(), vt, cache=tmp_path, progress=False)
    assert VeiledDataset(_Images(), worker_vt, cache=tmp_path, progress=False)._dir == ds._dir  # the same F's veils


def test_directory_cache_reads_one_file_per_sample(tmp_path, vt, monkeypatch):
    ds = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False).prepare()
    loads = []
    real = np.load
    monkeypatch.setattr(dataset_mod.np, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    fresh = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False)  # as in a worker
    x, y = fresh[5]
    assert len(loads) == 1  # not the 16 of its block: a DataLoader pass would cost batch_size loads per sample
    assert torch.equal(x, ds[5][0]) and y == 5


def test_directory_cache_does_not_hand_a_retrained_model_the_old_veils(tmp_path, lenet):
    kw = dict(steps=3, lr=50.0, threshold=float("-inf"), key=KEY, device="cpu")  # F's gradient shows in uint8
    vt = VeilTransform(lenet, **kw)
    VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False).prepare()
    retrained = copy.deepcopy(lenet)  # same class, same settings, same key: only the weights differ
    with torch.no_grad():
        retrained.conv1.weight.mul_(-1.0)
    vt2 = VeilTransform(retrained, **kw)
    x = _Images()[4][0]
    assert not torch.equal(vt2(x), vt(x))
    got = VeiledDataset(_Images(), vt2, batch_size=16, cache=tmp_path, progress=False)[4][0]
    assert torch.equal(got, vt2(x))
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 2  # one sub-folder per model's weights


def test_bad_cache_files_are_veiled_again(tmp_path, vt):
    ds = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False).prepare()
    want = [ds[i][0] for i in range(3)]
    files = {ds._digest(ds.dataset[i][0]): i for i in range(3)}
    for digest, i in files.items():
        f = ds._dir / f"{digest}.npy"
        if i == 0:
            f.write_bytes(b"")  # torn
        elif i == 1:
            np.save(f, np.zeros((3, 5, 5)))  # foreign shape and dtype
        else:
            f.write_bytes(b"\x93NUMPY garbage")
    fresh = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False)
    for i in range(3):
        got = fresh[i][0]
        assert got.dtype == torch.uint8 and torch.equal(got, want[i])
    again = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False)
    assert all(again._from_dir(d, again.dataset[i][0]) is not None for d, i in files.items())  # rewritten


def test_a_bad_cache_file_is_reported_once(tmp_path, vt, caplog):
    ds = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False).prepare()
    f = ds._dir / f"{ds._digest(ds.dataset[3][0])}.npy"
    f.write_bytes(b"")  # torn
    fresh = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        fresh[3]  # the sample's own look-up misses, then its block is veiled: one warning, not two
    assert [r.getMessage().count(f.name) for r in caplog.records] == [1]


def test_a_cache_that_cannot_be_written_warns_once_and_goes_on(tmp_path, vt, caplog, monkeypatch):
    want = VeiledDataset(_Images(), vt, batch_size=16, cache=None, progress=False)
    ds = VeiledDataset(_Images(), vt, batch_size=16, cache=tmp_path, progress=False)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset_mod.os, "fsync", full)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        got = [ds[i][0] for i in (0, 20, 39)]  # three blocks, three failed batches of writes
    assert all(torch.equal(g, want[i][0]) for g, i in zip(got, (0, 20, 39)))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "No space left on device" in msgs[0] and "not being cached" in msgs[0]
    assert [p.name for p in ds._dir.iterdir()] == ["settings.json"]  # no half-written temp files left


def test_changing_a_returned_sample_in_place_does_not_change_the_cache(vt):
    ds = VeiledDataset(_Images(), vt, batch_size=16, progress=False)
    want = ds[3][0].clone()  # veiled now, from the memory cache below
    for _ in range(2):
        ds[3][0].zero_()  # an in-place augmentation downstream
    assert torch.equal(ds[3][0], want)


def test_uncached_dataset_veils_only_the_sample_asked_for(vt, monkeypatch):
    sizes = []
    real = VeilTransform.veil_batch
    monkeypatch.setattr(VeilTransform, "veil_batch", lambda self, x, *a, **k: sizes.append(len(x)) or real(self, x, *a, **k))
    ds = VeiledDataset(_Images(), vt, batch_size=16, cache=None, progress=False)
    x, y = ds[5]
    assert sizes == [1] and torch.equal(x, vt(ds.dataset[5][0])) and y == 5  # not the 16 of its block, thrown away
    with pytest.raises(ValueError, match="keep none"):
        ds.prepare()


def test_dataset_bad_arguments(tmp_path, vt):
    with pytest.raises(TypeError, match="cache: expected"):
        VeiledDataset(_Images(), vt, cache=True)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="cannot be used"):
        VeiledDataset(_Images(), vt, cache=f)
    ds = VeiledDataset(_Images(), vt, progress=False)
    with pytest.raises(TypeError, match="slices are not supported"):
        ds[0:2]
    for bad in (torch.tensor(1.0), torch.tensor([1, 2]), True):
        with pytest.raises(TypeError, match="index must be an integer"):
            ds[bad]


def test_dataset_takes_the_integer_indices_samplers_hand_out(vt):
    """A 0-d integer tensor (from a tensor of indices, torch.randperm) or a numpy integer was refused
    as "slices are not supported": every integer-like index now reads the same sample as the int."""
    ds = VeiledDataset(_Images(), vt, cache="memory", progress=False)
    x, y = ds[3]
    for i in (torch.tensor(3), torch.arange(8)[3], np.int64(3), np.int32(-37)):
        xi, yi = ds[i]
        assert torch.equal(xi, x) and yi == y == 3 and type(yi) is int


def test_iterable_dataset_has_no_indexing(vt):
    class It(IterableDataset):
        def __iter__(self):
            yield from (u8(1)[0] for _ in range(3))

    ds = VeiledDataset(It(), vt, progress=False)
    with pytest.raises(TypeError, match="no indexing"):
        ds[0]
    with pytest.raises(TypeError, match="map-style"):
        ds.prepare()


class _Stream(IterableDataset):
    """``n`` samples, split by worker: with n = 1 the second worker's share is empty."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in range(w, self.n, nw):
            yield u8(1, seed=i)[0], i


def test_iterable_dataset_with_a_worker_whose_share_is_empty(vt):
    ds = VeiledDataset(_Stream(1), vt, cache=None, progress=False)
    got = list(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2))
    assert len(got) == 1 and torch.equal(got[0][0][0], vt(u8(1, seed=0)[0]))
    with pytest.raises(ValueError, match="dataset is empty"):  # in the main process, empty is still an error
        list(VeiledDataset(_Stream(0), vt, progress=False))


class _Drifting(IterableDataset):
    """8 images; from the second pass on, a random flip of each (an augmentation upstream)."""

    def __init__(self, drift):
        self.drift, self.passes = drift, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.passes)
        self.passes += 1
        for i in range(8):
            x = u8(1, seed=i)[0]
            yield (x.flip(-1) if self.drift and self.passes > 1 and torch.rand(1, generator=g) < 0.5 else x), i


@pytest.mark.parametrize("drift", [False, True])
def test_an_iterable_whose_images_change_between_passes_warns_that_the_cache_grows(vt, caplog, drift):
    """The iterable flavour's memory cache is keyed by content: a random transform upstream grew it by
    one veil per new draw, silently and without bound. It now warns once, from the pass where a
    stream that has been through once yields a new image."""
    ds = VeiledDataset(_Drifting(drift), vt, batch_size=4, progress=False)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        first = [x for x, _ in ds]
        assert caplog.records == [] and len(ds._memory) == 8
        for _ in range(3):
            again = [x for x, _ in ds]
    msgs = [r.getMessage() for r in caplog.records]
    if drift:
        assert len(msgs) == 1 and "without bound" in msgs[0] and len(ds._memory) > 8
    else:
        assert msgs == [] and len(ds._memory) == 8
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_an_iterable_veiling_into_the_memory_cache_in_a_worker_warns(vt, caplog, monkeypatch):
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: object())
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        list(VeiledDataset(_Stream(3), vt, progress=False))
        list(VeiledDataset(_Stream(3), vt, cache=None, progress=False))
    assert [r.getMessage().count("persistent_workers") for r in caplog.records] == [1]


def test_key_file_text_as_bytes_is_refused(tmp_path):
    from veil_transforms import keys

    path = tmp_path / "owner.key"
    key = keys.read_key_file(path, create=True)
    with pytest.raises(ValueError, match="hex text of a key"):
        keys.as_key(path.read_bytes())  # open(path, "rb").read(): 65 bytes of text, another key
    assert keys.as_key(path.read_text()) == key == keys.read_key_file(path)
    assert keys.as_key(b"\x01" * 32) == b"\x01" * 32


def test_audit_inversion_with_a_model_for_other_images(tmp_path, lenet):
    from veil_transforms import audit

    x = np.random.default_rng(0).integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not accept images of shape \\[3, 28, 28\\].*1 channels"):
        audit.run(x, x, attacks=["inversion"], model=lenet, inversion_steps=2)


def test_veil_names_a_channel_mismatch_in_one_line(lenet):
    with pytest.raises(ValueError, match=r"does not accept images of shape \[3, 28, 28\].*1 channels"):
        F.veil(lenet, u8(c=3), steps=2, key=KEY)


def test_missing_shard_is_named(tmp_path):
    from veil_transforms import shards

    with pytest.raises(shards.ShardError, match=f"cannot read shard {tmp_path}/veil-000000.tar: FileNotFoundError"):
        list(shards.load(str(tmp_path / "veil-000000.tar")))


def test_load_a_folder_or_none(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        LocalModel.load(tmp_path)
    with pytest.raises(TypeError, match="expected a file path"):
        LocalModel.load(None)


def test_audit_threshold_below_minus_one_says_why():
    from veil_transforms import audit

    x = np.zeros((2, 1, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="below -1 fails everything"):
        audit.run(x, x, thresholds=(-5, 0.3))


def test_pixels_that_require_grad_are_checked_without_a_warning():
    import warnings

    x = torch.rand(1, 1, 28, 28, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.check_pixels(x)


@pytest.mark.parametrize("first", ["tensor", "numpy"])
def test_an_image_f_refuses_before_one_it_takes_is_refused_not_passed_on(vt, first):
    """(RGB image, depth map) with a grey F: the map has F's shape and was veiled, the image handed on
    as it was (found by a helper's review). torchvision's rule veils the first plain tensor; F's shape
    picks the second: ambiguous, so refused, in VeilTransform and in VeiledDataset."""
    rgb = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    image = rgb if first == "tensor" else rgb.permute(1, 2, 0).numpy()
    depth = torch.rand(1, 28, 28)
    with pytest.raises(TypeError, match="cannot tell which of these is the image"):
        vt((image, depth))
    with pytest.raises(TypeError, match="cannot tell which of these is the image.*image_key="):
        VeiledDataset([(image, depth)], vt, progress=False)[0]
    img, d = vt((depth, rgb))  # the image first, F's shape: a target after it passes through
    assert torch.equal(img, vt(depth)) and torch.equal(d, rgb)
    boxes = np.zeros((5, 4), np.float32)  # before the image, but not of its H x W: passes, as it did
    out = vt({"boxes": boxes, "image": depth})
    assert torch.equal(out["image"], vt(depth)) and out["boxes"] is boxes


@pytest.mark.parametrize("cache", ["memory", "dir"])
def test_caches_follow_weights_loaded_after_the_dataset_was_made(cache, tmp_path):
    """The directory cache's sub-folder was named from F's weights when VeiledDataset was made: a checkpoint
    loaded afterwards (build the pipeline, then load_state_dict) got the previous F's veils back, and its
    own were filed under the old F's name; the memory cache held the old veils too (a helper's review)."""
    data = _Images(8)
    torch.manual_seed(1)
    ck_a = LeNet5().state_dict()
    torch.manual_seed(2)
    ck_b = LeNet5().state_dict()
    where = "memory" if cache == "memory" else tmp_path / "c"

    def fresh(ck):
        m = LeNet5()
        m.load_state_dict(ck)
        return VeilTransform(m, **kw)(data.x)

    kw = dict(steps=3, key=KEY, device="cpu", threshold=-float("inf"))  # every step runs: the veil depends on F
    assert not torch.equal(fresh(ck_a), fresh(ck_b))
    model = LeNet5()
    ds = VeiledDataset(data, VeilTransform(model, **kw), batch_size=8, cache=where, progress=False)
    for ck in (ck_a, ck_b, ck_a):  # with the dir cache, the third reads the first's files
        model.load_state_dict(ck)
        got = torch.stack([ds[i][0] for i in range(len(data))])
        assert torch.equal(got, fresh(ck))
    if cache == "dir":
        assert len([d for d in (tmp_path / "c").iterdir() if d.is_dir()]) == 3  # the made-with F's, A's, B's


def test_local_model_fingerprint_is_kept_until_a_weight_changes():
    lm = LocalModel(LeNet5())
    first = lm.fingerprint()
    assert lm.fingerprint() == first and lm._fingerprint[1] == first
    with torch.no_grad():
        next(lm.module.parameters())[0].add_(1.0)  # in place: its version counter moves
    second = lm.fingerprint(fast=True)
    assert second != first and lm.fingerprint() == second
    lm.module.pool1 = nn.AvgPool2d(2)  # a submodule swapped, no weight changed: the full check (a miss) sees it
    assert lm.fingerprint() != second


class _Counting(VeilTransform):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sizes = []

    def veil_batch(self, x, *a, **kw):
        self.sizes.append(len(x))
        return super().veil_batch(x, *a, **kw)


@pytest.mark.parametrize("cache", ["memory", "dir"])
def test_a_random_transform_in_the_dataset_costs_one_veil_per_access_not_a_block(lenet, cache, tmp_path, caplog):
    """A random transform inside the wrapped dataset makes every access after the first a miss: each
    veiled its whole block (batch_size images) to use one, 285 veils for 32 samples, and the directory
    cache did not warn (a helper's review). Now a miss in a block veiled before veils that sample alone,
    with one warning, for either cache."""
    data = _Flipping()
    veil = _Counting(lenet, steps=2, key=KEY, device="cpu")
    ds = VeiledDataset(data, veil, batch_size=4, cache="memory" if cache == "memory" else tmp_path, progress=False)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        for _ in range(5):
            for i in range(len(data)):
                got, target = ds[i]
                assert torch.equal(got, vt_of(veil, data.x[i].flip(-1) if target["flipped"] else data.x[i]))
    assert veil.sizes[0] == 4 and set(veil.sizes[1:]) <= {1}, veil.sizes
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "another image" in msgs[0] and "not of its batch of 4" in msgs[0], msgs
    assert (str(tmp_path) in msgs[0]) == (cache == "dir")


def vt_of(veil, x):
    return VeilTransform.veil_batch(veil, x[None])[0]


def test_a_batch_of_mixed_shapes_warns_once(vt, caplog):
    class Sizes(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return u8(1, s=28 + 2 * (i % 3), seed=i)[0], i

    ds = VeiledDataset(Sizes(), vt, batch_size=6, progress=False)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        ds.prepare()
        ds.prepare()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "3 different shapes" in msgs[0] and "1x28x28" in msgs[0], msgs


def test_a_weak_hardened_pad_names_the_dataset_sample(lenet):
    """The hardened veil's refusal of a (nearly) blank mid-grey image named its place in the batch
    ('sample 3'), not its index in the dataset (7)."""
    data = _Images(10)
    data.x = data.x.float() / 255
    data.x[7] = 0.5  # exactly mid-grey: 0 after normalization, no flip bit
    veil = VeilTransform(lenet, steps=2, key=KEY, device="cpu", mode="hardened")
    with pytest.raises(ValueError, match=r"the flip bits of sample 7 \("):
        VeiledDataset(data, veil, batch_size=4, progress=False).prepare()
    with pytest.raises(ValueError, match=r"the flip bits of sample 7 \("):  # uncached: veiled alone
        VeiledDataset(data, veil, batch_size=4, cache=None, progress=False)[7]


class _FunctionalBN(nn.Module):
    """BatchNorm written functionally, `training=self.training`: torch.fx inlines the branch."""

    def __init__(self):
        super().__init__()
        self.c, self.fc1, self.fc2 = nn.Conv2d(1, 8, 3), nn.Linear(8, 16), nn.Linear(16, 10)
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x):
        x = torch.relu(nn.functional.batch_norm(self.c(x), self.rm, self.rv, training=self.training)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def test_layer_of_a_model_in_train_mode_runs_its_eval_graph():
    """layer= builds a torch.fx extractor, which has its own train/eval flag: made from a model in train
    mode, the veil ran its train graph (running statistics updated, each veil depending on the rest of
    its batch; a helper's review)."""
    torch.manual_seed(0)
    m = _FunctionalBN().train()
    v = VeilTransform(m, key=KEY, steps=5, device="cpu", layer="fc1", threshold=-float("inf"))
    x = u8(4, seed=3)
    rm = m.rm.clone()
    batch = v(x)
    assert torch.equal(m.rm, rm) and m.training
    assert torch.equal(batch, torch.cat([v(x[i : i + 1]) for i in range(4)]))


def test_a_refusal_does_not_outlive_the_fix():
    m = LeNet5().double()
    v = VeilTransform(m, key=KEY, steps=2, device="cpu")
    with pytest.raises(ValueError, match="float64 weights"):
        v(u8(1)[0])
    m.float()  # the fix the message asks for, on the same module
    assert v(u8(1)[0]).shape == (1, 28, 28)


def test_a_key_given_as_a_file_name_or_path_points_to_read_key_file(lenet, tmp_path):
    from pathlib import Path

    with pytest.raises(ValueError, match=r"looks like a file name: pass keys.read_key_file\('owner.key'\)"):
        VeilTransform(lenet, key="owner.key", device="cpu")
    with pytest.raises(TypeError, match="got a path .*pass keys.read_key_file"):
        VeilTransform(lenet, key=Path(tmp_path / "owner.key"), device="cpu")


def test_dataset_repr_names_what_it_wraps(vt, tmp_path):
    r = repr(VeiledDataset(_Images(4), vt, batch_size=2, cache=tmp_path / "c", progress=False))
    assert r.startswith("VeiledDataset(_Images, 4 samples, veil=VeilTransform(") and "batch_size=2" in r
    assert f"cache='{tmp_path / 'c'}'" in r and "object at" not in r


def test_a_key_file_others_can_read_warns_once(tmp_path, caplog):
    from veil_transforms import keys

    f = tmp_path / "owner.key"
    keys.read_key_file(f, create=True)
    with caplog.at_level("WARNING", logger="veil_transforms"):
        keys.read_key_file(f)
        assert not caplog.records  # created 0600
        f.chmod(0o620)  # group may write, not read: not what the warning is about
        keys.read_key_file(f)
        assert not caplog.records
        f.chmod(0o644)
        keys.read_key_file(f)
        keys.read_key_file(f)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "mode 0644" in msgs[0] and "chmod 600" in msgs[0], msgs


def test_rgba_pil_images_go_to_a_four_channel_f_and_p_mode_says_mask():
    """An RGBA PIL image was refused even for an F of 4 channels (the same pixels as a 4-channel array
    were veiled); a mode-P image's hint now names the mask case (a helper's review)."""
    torch.manual_seed(0)
    v = VeilTransform(LeNet5(4, 2), steps=2, key=KEY, device="cpu")
    a = torch.randint(0, 256, (28, 28, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    out = v(PIL.Image.fromarray(a, mode="RGBA"))
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out), v(a))
    with pytest.raises(ValueError, match="mode P is not an image: pass it as tv_tensors.Mask"):
        v(PIL.Image.new("P", (28, 28)))
    grey = VeilTransform(LeNet5(1, 2), steps=2, key=KEY, device="cpu")
    with pytest.raises(ValueError, match=r"RGBA \(4 channels\): convert\('RGB'\) first"):
        grey(PIL.Image.fromarray(a, mode="RGBA"))


def test_a_cache_that_cannot_be_written_warns_once_and_blames_no_transform(vt, tmp_path, caplog, monkeypatch):
    """A directory cache that cannot be written (disk full, read-only): one warning, right veils; a later
    miss in a veiled block is then not blamed on a random transform in the dataset."""
    def full(path, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset_mod, "_atomic_save", full)
    data = _Images(8)
    ds = VeiledDataset(data, vt, batch_size=4, cache=tmp_path, progress=False)
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        for i in (0, 1, 2, 5):
            assert torch.equal(ds[i][0], vt(data.x[i]))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "cannot write the veil cache" in msgs[0] and "No space left" in msgs[0], msgs


class _ViewFlatten(nn.Module):
    """x.view(x.size(0), -1) on a 4-d activation: needs contiguous memory."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).view(x.size(0), -1))


def test_a_model_that_flattens_with_view_is_veiled_contiguous():
    """The veil runs 3+ channels channels-last; an F flattening with .view failed inside the loop with
    torch's raw 'view size is not compatible' (the up-front check ran it contiguous; a helper's review)."""
    torch.manual_seed(0)
    m = _ViewFlatten().eval()
    x = u8(2, c=3, s=32)
    kw = dict(key=KEY, device="cpu", steps=3, threshold=-float("inf"))
    got = VeilTransform(m, **kw).veil_batch(x)
    ref = F.veil(m, x, key=KEY, steps=3, threshold=-float("inf"), lr=F.DEFAULT_LR, device="cpu", channels_last=False)
    assert torch.equal(got, ref)


def test_a_block_that_failed_half_way_is_veiled_whole_next_time(vt, caplog):
    """The block was marked veiled before it was: an error while reading or veiling it (caught by the
    caller, or Ctrl-C) made every later miss a lone veil with a false 'random transform' warning (a
    helper's review)."""
    class Flaky(_Images):
        failed = False

        def __getitem__(self, i):
            if i == 2 and not self.failed:
                self.failed = True
                raise OSError("transient read error")
            return super().__getitem__(i)

    class FlakyVeil(_Counting):
        failed = False

        def veil_batch(self, x, *a, **kw):
            if not self.failed:
                self.failed = True
                raise RuntimeError("interrupted")
            return super().veil_batch(x, *a, **kw)

    for data, veil, error in ((Flaky(4), _Counting(vt.local_model.module, steps=2, key=KEY, device="cpu"), OSError),
                              (_Images(4), FlakyVeil(vt.local_model.module, steps=2, key=KEY, device="cpu"), RuntimeError)):
        ds = VeiledDataset(data, veil, batch_size=4, progress=False)
        with pytest.raises(error):
            ds[0]
        caplog.clear()
        with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
            assert all(torch.equal(ds[i][0], vt(data.x[i])) for i in range(4))
        assert veil.sizes == [4] and not caplog.records, (veil.sizes, caplog.records)


def test_a_workers_cache_hits_look_at_the_weights_once(vt, monkeypatch):
    """In a DataLoader worker F is a copy made when the worker started, which the main process's later
    changes never reach: its cache hits check the weights once, not per hit (the main process's hits
    check each time; test_dataloader_workers_follow_weights_changed_between_epochs)."""
    ds = VeiledDataset(_Images(4), vt, batch_size=4, progress=False).prepare()
    calls = []
    real = LocalModel.fingerprint
    monkeypatch.setattr(LocalModel, "fingerprint", lambda self, fast=False: calls.append(fast) or real(self, fast))
    ds[0]
    assert calls == [True]
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: object())
    ds[1], ds[2], ds[3]
    assert calls == [True, True]


def _noisy_lenet(seed):
    torch.manual_seed(seed)
    return LeNet5()


@pytest.mark.parametrize("cache", ["memory", "dir"])
def test_dataloader_workers_follow_weights_changed_between_epochs(cache, tmp_path):
    """Non-persistent workers start each epoch with a copy of the F of that moment: after F changed, they
    handed out the old F's veils from the caches (a regression of the worker fast path, found by a
    helper's review)."""
    data = _Images(4)
    kw = dict(steps=3, key=KEY, device="cpu", threshold=-float("inf"))
    model = _noisy_lenet(1)
    ds = VeiledDataset(data, VeilTransform(model, **kw), batch_size=4, progress=False,
                       cache="memory" if cache == "memory" else tmp_path).prepare()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    first = next(iter(loader))[0]
    model.load_state_dict(_noisy_lenet(2).state_dict())
    second = next(iter(loader))[0]
    assert torch.equal(first, VeilTransform(_noisy_lenet(1), **kw)(data.x))
    assert torch.equal(second, VeilTransform(_noisy_lenet(2), **kw)(data.x))


def test_fast_fingerprint_sees_replaced_parameters_submodules_and_dtypes():
    """The cache hit's check summed version counters only: a swapped layer, load_state_dict(assign=True),
    a new Parameter or .half().float() kept the old fingerprint (a helper's review)."""
    import copy

    lm = LocalModel(_noisy_lenet(1))
    other = _noisy_lenet(2)
    changes = [lambda m: setattr(m, "fc3", copy.deepcopy(other.fc3)),
               lambda m: m.load_state_dict(other.state_dict(), assign=True),
               lambda m: setattr(m.fc2, "weight", nn.Parameter(m.fc2.weight.detach() + 1)),
               lambda m: m.half().float()]
    for change in changes:
        before = lm.fingerprint()
        change(lm.module)
        assert lm.fingerprint(fast=True) != before


def test_a_cache_folder_unwritable_when_f_changes_goes_on_uncached(vt, tmp_path, caplog, monkeypatch):
    model = _noisy_lenet(1)
    kw = dict(steps=2, key=KEY, device="cpu", threshold=-float("inf"))
    data = _Images(4)
    ds = VeiledDataset(data, VeilTransform(model, **kw), batch_size=4, cache=tmp_path, progress=False).prepare()
    real = type(tmp_path).mkdir

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "mkdir", full)
    model.load_state_dict(_noisy_lenet(2).state_dict())
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        got = torch.stack([ds[i][0] for i in range(4)])
    monkeypatch.setattr(type(tmp_path), "mkdir", real)
    assert torch.equal(got, VeilTransform(_noisy_lenet(2), **kw)(data.x))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "cannot write the veil cache" in msgs[0], msgs


def test_a_damaged_cache_file_is_not_blamed_on_a_random_transform(vt, tmp_path, caplog):
    data = _Images(4)
    ds = VeiledDataset(data, vt, batch_size=4, cache=tmp_path, progress=False).prepare()
    victim = next(ds._dir.glob("*.npy"))
    victim.write_bytes(b"damaged")
    with caplog.at_level("WARNING", logger="veil_transforms.dataset"):
        assert all(torch.equal(ds[i][0], vt(data.x[i])) for i in range(4))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "is unusable" in msgs[0], msgs


def test_16_bit_images_are_told_to_scale_not_convert(vt):
    """A 16-bit PIL image was told "convert('L') first", which clips every value over 255 to white (a
    16-bit scan comes out nearly all 255); 16- and 32-bit arrays and tensors now say to scale to float."""
    a = (np.arange(28 * 28).reshape(28, 28) * 80).astype(np.uint16)
    assert (np.asarray(PIL.Image.fromarray(a).convert("L")) == 255).mean() > 0.9  # what the old hint gave
    for bad in (PIL.Image.fromarray(a), PIL.Image.fromarray(a.astype(np.int32)), a, a.astype(np.int32)):
        with pytest.raises((TypeError, ValueError), match=r"scale them to float in \[0, 1\]") as e:
            vt(bad)
        assert "convert('L') or" not in str(e.value)
    for bad in (torch.from_numpy(a.astype(np.int32))[None], torch.from_numpy(a.astype(np.int32)).to(torch.uint16)[None]):
        with pytest.raises(TypeError, match=r"x.float\(\) / 65535"):
            vt(bad)
    scaled = vt(torch.from_numpy(a.astype(np.float32) / 65535)[None])  # as the hint says: veiled
    assert scaled.shape == (1, 28, 28) and scaled.is_floating_point()
    # int64 of 0..255 (torch.randint, np.array of ints) is not 16-bit: /65535 would veil a black image
    for bad in (torch.randint(0, 256, (1, 28, 28)), np.random.default_rng(0).integers(0, 256, (28, 28)),
                torch.zeros(1, 28, 28, dtype=torch.int8), torch.randint(0, 256, (1, 28, 28)).to(torch.int16),
                torch.randint(0, 256, (1, 28, 28)).to(torch.uint16), np.full((28, 28), 200, np.uint16)):
        with pytest.raises(TypeError, match=r"values 0..255: convert them with .to\(torch.uint8\)"):
            vt(bad)
    with pytest.raises(TypeError, match="a mask"):
        vt(torch.zeros(1, 28, 28, dtype=torch.bool))
    with pytest.raises(TypeError, match="negative values"):
        vt(torch.full((1, 28, 28), -3, dtype=torch.int8))


def test_memory_cache_follows_a_key_changed_in_place(lenet):
    """The cached settings id (computed once per change, not per hit) held the key by reference: a
    bytearray key changed in place compared equal to itself and the old key's veils came back (a review
    of the day's diff)."""
    data = [(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)), 0)
            for i in range(2)]
    veil = VeilTransform(lenet, key=KEY, steps=1, device="cpu")
    veil.key = bytearray(veil.key)
    ds = VeiledDataset(data, veil, progress=False)
    before = ds[0][0].clone()
    veil.key[0] ^= 0xFF
    fresh = VeilTransform(lenet, key=bytes(veil.key), steps=1, device="cpu")(data[0][0])
    assert not torch.equal(before, fresh) and torch.equal(ds[0][0], fresh)
