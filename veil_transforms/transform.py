"""``VeilTransform``: the veil as a torchvision v2 transform.

Accepts PIL images, numpy arrays (HW, HWC or a batch BHWC), tensors (uint8 or
float in [0, 1], ``[C, H, W]`` or ``[B, C, H, W]``) and ``tv_tensors.Image``,
and returns the same type and shape. Everything else in a sample (labels,
masks, boxes, metadata) passes through untouched, as with any v2 transform.
Every image of a sample is veiled: several must be marked (``tv_tensors.Image``
or PIL); several plain tensors / arrays that F takes as images are refused.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from . import functional as F
from . import keys as _keys
from .model import LocalModel, local_model_on

log = logging.getLogger(__name__)


def _is_image_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.ndim in (2, 3, 4)


def _is_unmarked_image(x: Any) -> bool:
    """A plain uint8 / float tensor or numpy array shaped like an image or a batch of them."""
    if type(x) is torch.Tensor:
        return x.ndim in (3, 4) and (x.dtype == torch.uint8 or x.is_floating_point())
    return _is_image_array(x) and (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating))


def _sample_shape(x: Any) -> tuple[int, ...]:
    """(C, H, W) of one image of ``x`` (see :func:`_is_unmarked_image`)."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[-3:])
    h, w = x.shape[-3:-1] if x.ndim == 4 else x.shape[:2]
    return (1 if x.ndim == 2 else x.shape[-1], h, w)


def _is_image_tensor(x: Any) -> bool:
    # pure tensors and tv_tensors.Image; masks, boxes and other tv_tensors pass through
    return type(x) is torch.Tensor or isinstance(x, tv_tensors.Image)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class VeilTransform(v2.Transform):
    """Veil images with the paper's random pixel flipping + gradient iteration.

    Args:
        model: the owner's local model F: an ``nn.Module``, a ``LocalModel`` or a
            path to a ``.pt`` (TorchScript) or ``.onnx`` file.
        p, alpha, beta, steps, threshold: the paper's settings (defaults: 0.5,
            0.999, 0.001, 300, 0.3).
        lr: gradient-iteration step size (the paper gives none; see README).
        layer: which layer of F to match (None: the output logits).
        key: secret bytes (or hex str) from which each sample's mask is derived;
            None draws a fresh one (read it back from ``.key`` to save it).
        device: where the gradient iteration runs (default: CUDA if present). A model
            elsewhere is copied there and yours stays where it is (the veil then does not see
            later in-place changes to yours); a model already there is used as it is.
        output: ``"uint8"`` snaps results to the 256-level grid (PNG-safe);
            ``"float"`` keeps full precision for float inputs.
        mode: ``"paper"`` is exactly the paper's Algorithm 1 (a key-free fold
            attack reads it, see README "What it protects"); ``"hardened"``
            starts from a keyed one-time pad and matches F's output only, and
            holds against the audit's attacks (README "Which mode to use").
        precision, cuda_graph, compile, fold_bn: GPU speed levers
            (``"bf16"`` autocast for F's forward; CUDA-graph replay of the
            steps, default on for CUDA devices; ``torch.compile`` of F and the
            loss; BatchNorm folded into the convolutions); see README
            "Speed" for what they buy. Only ``precision`` changes the veil
            beyond float rounding; its utility on MNIST (H100, 40 keys): -0.07 ±
            0.17 points against the fp32 veil, within 0.5 (README "Speed").

    Convention: uint8 pixels in [0, 255] or float pixels in [0, 1]; channels
    first for tensors, channels last for numpy arrays.
    """

    _transformed_types = (_is_image_tensor, PIL.Image.Image, _is_image_array)

    def __init__(
        self,
        model,
        *,
        p: float = F.PAPER["p"],
        alpha: float = F.PAPER["alpha"],
        beta: float = F.PAPER["beta"],
        steps: int = F.PAPER["steps"],
        threshold: float = F.PAPER["threshold"],
        lr: float = F.DEFAULT_LR,
        layer: str | None = None,
        key: bytes | str | None = None,
        device: torch.device | str | None = None,
        output: str = "uint8",
        mode: str = "paper",
        precision: str = "fp32",
        cuda_graph: bool | None = None,
        compile: bool = False,
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        F.check_settings(p=p, alpha=alpha, beta=beta, lr=lr, steps=steps, threshold=threshold, output=output,
                         mode=mode, precision=precision)
        self.device = F.resolve_device(device) if device is not None else default_device()
        self.local_model: LocalModel = local_model_on(model, self.device, layer)
        self.key = _keys.as_key(key)
        self.p, self.alpha, self.beta, self.steps = float(p), float(alpha), float(beta), int(steps)
        self.threshold, self.lr, self.output, self.mode = float(threshold), float(lr), output, mode
        self.precision, self.cuda_graph = precision, None if cuda_graph is None else bool(cuda_graph)
        self.compile, self.fold_bn = bool(compile), bool(fold_bn)

    @property
    def layer(self) -> str | None:
        return self.local_model.layer

    @property
    def settings(self) -> dict:
        """The public veil parameters (never the key)."""
        return dict(
            mode=self.mode, p=self.p, alpha=self.alpha, beta=self.beta, steps=self.steps,
            threshold=self.threshold, lr=self.lr, layer=self.layer, output=self.output,
            model=self.local_model.name, precision=self.precision,
        )

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"mode={s['mode']!r}, p={s['p']}, steps={s['steps']}, lr={s['lr']}, alpha={s['alpha']}, "
            f"beta={s['beta']}, threshold={s['threshold']}, layer={s['layer']!r}, output={s['output']!r}, "
            f"device={str(self.device)!r}, model={s['model']!r}, key=<{_keys.key_fingerprint(self.key)}>"
        )

    def __repr__(self) -> str:  # nn.Module's repr would dump the whole local model
        return f"{type(self).__name__}({self.extra_repr()})"

    # -- the core: one batch of tensors ---------------------------------------
    def check_shape(self, sample_shape) -> None:
        """Raise ValueError if F does not take images of ``sample_shape`` (C, H, W)."""
        self.local_model.check_input(tuple(sample_shape))

    def veil_batch(self, images: torch.Tensor, uniforms: torch.Tensor | None = None,
                   pad_uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """Veil a ``[B, C, H, W]`` uint8 / float tensor; returns the same dtype, device and shape.

        ``uniforms``: :meth:`uniforms` of the same images, if computed ahead; ``pad_uniforms``
        likewise the hardened mode's pad (see :func:`functional.veil`).
        """
        F.check_pixels(images, "images")
        if images.ndim != 4:
            raise ValueError(f"veil_batch expects [B, C, H, W], got {tuple(images.shape)}")
        self.check_shape(images.shape[1:])
        return F.veil(
            self.local_model, images, key=self.key, p=self.p, alpha=self.alpha, beta=self.beta,
            lr=self.lr, steps=self.steps, threshold=self.threshold, output=self.output, mode=self.mode,
            device=self.device, precision=self.precision, cuda_graph=self.cuda_graph,
            compile=self.compile, fold_bn=self.fold_bn, uniforms=uniforms, pad_uniforms=pad_uniforms,
        )

    def warm_up(self, batch_size: int, sample_shape) -> bool:
        """Do the GPU's one-time work for batches of ``batch_size`` images of ``sample_shape`` now.

        Runs a few steps on a dummy batch with this veil's settings: the CUDA context and libraries,
        cuDNN's autotuning, ``compile``'s compilation and, with ``cuda_graph``, the capture of the
        graph that the first real batch of this size then replays from its first step (a kept graph,
        see :func:`functional.clear_graph_cache`). ``veil-shard`` calls it on its GPU thread while its
        I/O workers start and decode the first batch, so that work is off the critical path.
        Returns False (and does nothing) off CUDA, where there is nothing to warm.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"warm_up: batch_size must be an integer >= 1, got {batch_size!r}")
        if self.device.type != "cuda":
            return False
        self.check_shape(tuple(sample_shape))
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch_size, *sample_shape), dtype=torch.uint8, generator=g)
        with F.warming_up():  # noise stops sooner than images: capture even if most of the batch stopped
            F.veil(  # the fewest steps that capture a graph (and replay it once)
                self.local_model, x, generator=g, p=self.p, alpha=self.alpha, beta=self.beta, lr=self.lr,
                steps=min(self.steps, F.WARMUP_STEPS + F.CHECK_EVERY), threshold=self.threshold, output=self.output,
                mode=self.mode, device=self.device, precision=self.precision, cuda_graph=self.cuda_graph,
                compile=self.compile, fold_bn=self.fold_bn,
            )
        return True

    def uniforms(self, images: torch.Tensor) -> torch.Tensor:
        """The key's per-sample uniforms for ``[B, C, H, W]`` images (CPU work; see :meth:`veil_batch`)."""
        return F.keyed_uniforms(self.key, F.normalize(images))

    # -- v2.Transform hooks ----------------------------------------------------
    def _needs_transform_list(self, flat_inputs: list[Any]) -> list[bool]:
        return self.image_leaves(flat_inputs)

    def image_leaves(self, flat_inputs: list[Any]) -> list[bool]:
        """Which of a sample's leaves (``torch.utils._pytree.tree_flatten``) are images to veil; raises
        TypeError where it cannot tell. VeiledDataset finds a sample's images by the same rule."""
        # Every image in a sample must come out veiled, so this does not guess. torchvision's rule (the
        # first plain tensor is the image, the others pass through) would hand on the second image of a
        # pair unveiled, and a numpy mask beside a tensor image would be veiled in the image's place.
        # Marked images (tv_tensors.Image, PIL) are all veiled, and beside them plain tensors pass
        # through (torchvision's rule for samples with marked images). Without marked images, the
        # images among plain uint8/float tensors [C, H, W] / [B, C, H, W] and numpy HW / HWC / BHWC
        # arrays are those F takes: detection targets (masks [N, H, W], keypoints, heatmaps [K, H, W])
        # pass through; several such are refused, and so is one F takes after one of its H x W that it
        # does not take (torchvision would veil the first: an RGB image beside a depth map F takes must not
        # be handed on unveiled); a lone one F refuses is veiled, so that its error names the shape.
        if any(isinstance(x, tv_tensors.Video) for x in flat_inputs):
            raise TypeError("VeilTransform does not veil tv_tensors.Video (handing it on unveiled would leak it): "
                            "veil its frames as a batch [T, C, H, W] tensor")
        marked = [isinstance(x, (tv_tensors.Image, PIL.Image.Image)) for x in flat_inputs]
        if any(marked):
            if not getattr(self, "_warned_plain", False) and any(
                    not m and _is_unmarked_image(x) and self.local_model.accepts(_sample_shape(x))
                    for x, m in zip(flat_inputs, marked)):
                self._warned_plain = True  # once: a pair dataset would say it every sample
                log.warning("VeilTransform: a plain tensor or array of the shape F takes passes through unveiled "
                            "beside marked images (torchvision's rule: plain tensors beside a tv_tensors.Image or "
                            "PIL image are not images); if it is an image, mark it as tv_tensors.Image (or stack "
                            "the images into one batch), or a mask as tv_tensors.Mask")
            return marked
        unmarked = [_is_unmarked_image(x) for x in flat_inputs]
        taken = [u and self.local_model.accepts(_sample_shape(x)) for x, u in zip(flat_inputs, unmarked)]
        if sum(taken) > 1:
            seen = ", ".join(_describe(x) for x, t in zip(flat_inputs, taken) if t)
            raise TypeError(
                f"VeilTransform cannot tell which of these are images ({seen}) and does not guess: an image "
                "handed on unveiled would leak it. Mark them: images as tv_tensors.Image or PIL images (all "
                "are veiled), masks and maps as tv_tensors.Mask (passed through); or stack the images into "
                "one batch ([B, C, H, W] tensor, BHWC array)"
            )
        first = unmarked.index(True) if any(unmarked) else None
        later = taken.index(True) if any(taken) else None
        if later is not None and not taken[first] and \
                _sample_shape(flat_inputs[first])[1:] == _sample_shape(flat_inputs[later])[1:]:
            # e.g. (RGB image, depth map) with a grey F, which takes the map: the same H x W in another
            # channel count reads as the image (boxes [N, 4] or a map of another size before it do not)
            raise TypeError(
                f"VeilTransform cannot tell which of these is the image ({_describe(flat_inputs[first])}, which F "
                f"does not take, then {_describe(flat_inputs[later])}, which it does) and does not guess: "
                "torchvision's rule would veil the first, F's shape the second, and the image handed on unveiled "
                "would leak it. Mark them: images as tv_tensors.Image or PIL images, masks and maps as "
                "tv_tensors.Mask (passed through); or give F the image's shape"
            )
        if any(taken):
            needs = taken
        elif any(unmarked):  # none that F takes: the first, whose veil then fails naming its shape
            needs = [i == first for i in range(len(flat_inputs))]
        else:  # a lone plain tensor of another shape: transform() refuses it, naming its shape
            needs = super()._needs_transform_list(flat_inputs)
        if not any(needs):
            seen = ", ".join(_describe(x) for x in flat_inputs[:4]) + (", ..." if len(flat_inputs) > 4 else "")
            raise TypeError(
                f"VeilTransform found no image to veil in its input ({seen}): expected a PIL image, a numpy "
                "array HW, HWC or BHWC, a tensor [C, H, W] or [B, C, H, W], or a tv_tensors.Image"
            )
        return needs

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        try:
            return self._transform(inpt)
        except ValueError as e:  # F refusing a numpy array's shape: often CHW or BHW read as channels last
            if isinstance(inpt, PIL.Image.Image) and inpt.mode == "RGBA" and "does not accept images" in str(e):
                raise ValueError(f"{e}. This PIL image is RGBA (4 channels): convert('RGB') first, unless F "
                                 "takes 4 channels") from None
            if not isinstance(inpt, np.ndarray) or "does not accept images" not in str(e):
                raise
            layout = "B, H, W, C" if inpt.ndim == 4 else "H, W, C" if inpt.ndim == 3 else "H, W"
            raise ValueError(f"{e}. numpy arrays are read channels last: this one, of shape {inpt.shape}, as "
                             f"{layout}; for a channels-first array pass a tensor (torch.from_numpy), for a "
                             "batch of grey images B, H, W add a channel axis (a[..., None])") from None

    def _transform(self, inpt: Any) -> Any:
        if isinstance(inpt, torch.Tensor) and inpt.ndim == 4:
            out = self.veil_batch(inpt.as_subclass(torch.Tensor))
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out
        if isinstance(inpt, np.ndarray) and inpt.ndim == 4:  # B, H, W, C
            if len(inpt) == 0:
                raise ValueError("veil: empty batch")
            to_chw(inpt[0])  # validates dtype and layout
            t = torch.from_numpy(np.array(inpt, copy=True, order="C")).permute(0, 3, 1, 2)
            return self.veil_batch(t).permute(0, 2, 3, 1).contiguous().numpy()
        return from_chw(self.veil_batch(to_chw(inpt)[None])[0], inpt)


def _describe(x: Any) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} of shape {tuple(x.shape)}"
    return type(x).__name__


# 16-bit (medical, microscopy) and 32-bit images: convert('L') and astype(uint8) clip or wrap them
_DEEP_HINT = ("16- or 32-bit pixels: scale them to float in [0, 1] (e.g. np.asarray(im, np.float32) / 65535 for "
              "16 bits); PIL's convert('L') clips them at 255")


def to_chw(inpt: Any) -> torch.Tensor:
    """One image (PIL, numpy HW/HWC, tensor CHW, tv_tensors.Image) as a plain ``[C, H, W]`` tensor."""
    if isinstance(inpt, PIL.Image.Image):
        if inpt.mode not in ("L", "RGB", "RGBA"):
            deep = inpt.mode in ("I", "F") or inpt.mode.startswith("I;16")
            how = (_DEEP_HINT if deep else "convert('L') or convert('RGB') first") + (
                " (a segmentation mask in mode P is not an image: pass it as tv_tensors.Mask, or give "
                "VeiledDataset image_key=)" if inpt.mode == "P" else "")
            raise ValueError(f"PIL images must be mode 'L', 'RGB' or 'RGBA' (for an F of 4 channels), got "
                             f"{inpt.mode!r}: {how}")
        inpt = np.asarray(inpt)
    if isinstance(inpt, np.ndarray):
        if inpt.dtype != np.uint8 and not np.issubdtype(inpt.dtype, np.floating):
            hint = F._int_hint(inpt) if np.issubdtype(inpt.dtype, np.integer) or inpt.dtype == np.bool_ else ""
            raise TypeError(f"numpy images must be uint8 or float, got {inpt.dtype}{hint}")
        if inpt.ndim not in (2, 3):
            raise ValueError(f"numpy image must be HW or HWC, got shape {inpt.shape}")
        t = torch.from_numpy(np.array(inpt, copy=True, order="C"))
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()
    if isinstance(inpt, torch.Tensor):
        if inpt.ndim != 3:
            grey = "; for one grey image [H, W] add a channel axis (x[None])" if inpt.ndim == 2 else ""
            raise ValueError(f"expected an image [C, H, W] or a batch [B, C, H, W], got shape {tuple(inpt.shape)}"
                             + grey)
        return inpt.as_subclass(torch.Tensor)
    raise TypeError(f"cannot veil {type(inpt).__name__}: expected a PIL image, numpy array or tensor")


def from_chw(t: torch.Tensor, like: Any) -> Any:
    """Convert a veiled ``[C, H, W]`` tensor back to the type and layout of ``like``."""
    if isinstance(like, PIL.Image.Image):
        return PIL.Image.fromarray(from_chw(t, np.asarray(like)))
    if isinstance(like, np.ndarray):
        a = t.cpu().numpy()
        return a[0] if like.ndim == 2 else np.ascontiguousarray(a.transpose(1, 2, 0))
    if isinstance(like, tv_tensors.Image):
        return tv_tensors.wrap(t, like=like)
    return t
