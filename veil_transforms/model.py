"""The data owner's local model F: one adapter for nn.Modules, TorchScript and ONNX files.

``LocalModel(module, layer=None)`` is a callable ``[B, C, H, W] -> [B, n]``.
``layer=None`` returns the model's output (the paper's choice); a node name
(e.g. ``"fc2"``, see ``LocalModel.layers()``) returns that inner layer,
flattened, through torchvision's feature extraction.

During the veil loop the module is in eval mode and its parameters do not
require grad, so no weight gradients are computed and ``.grad`` is never
touched; both are restored afterwards (:func:`frozen`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import itertools
import logging
import os
import pickle
import re
import threading
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn


log = logging.getLogger(__name__)
_FROZEN_LOCK = threading.Lock()
_FROZEN: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()  # module -> [depth, modes, flags]


def modes_of(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each submodule's own train/eval flag (``train()`` would give them all the parent's)."""
    return [(m, m.training) for m in module.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


@contextlib.contextmanager
def frozen(model):
    """Eval mode and no parameter grads for the duration; restores both afterwards.

    Counted per module: veils overlapping in several threads (or nested) share one freeze, and the
    last to leave restores, so one veil ending does not put F back in train mode under another
    (which then updated BatchNorm's running statistics and changed its veil). Each submodule's own
    mode is restored: a model in train mode with a frozen BatchNorm (``m.train(); m.bn.eval()``)
    gets its BatchNorm back in eval mode."""
    if isinstance(model, LocalModel) and model._extractor is not None:
        # layer=: the torch.fx extractor has its own train/eval flag, and its train graph inlines every
        # `self.training` branch (BatchNorm statistics updated, dropout on): freeze it too, after F
        with frozen(model.module), frozen(model._extractor):
            yield
        return
    module = model.module if isinstance(model, LocalModel) else model
    if not isinstance(module, nn.Module):
        yield
        return
    with _FROZEN_LOCK:
        state = _FROZEN.get(module)
        if state is None:
            state = _FROZEN[module] = [0, modes_of(module), [(p, p.requires_grad) for p in module.parameters()]]
            module.eval()
            for p, _ in state[2]:
                p.requires_grad_(False)
        state[0] += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            state[0] -= 1
            if state[0] == 0:
                del _FROZEN[module]
                for p, rg in state[2]:
                    p.requires_grad_(rg)
                module.train(state[1][0][1])  # the module's own train() (an override may do more) ...
                restore_modes(state[1])  # ... then each submodule's own flag


class _Fingerprint(NamedTuple):
    """LocalModel.fingerprint() kept: for the walk's signature, its digest, and the cheap token of the
    tensors it hashed."""
    sig: tuple
    digest: str
    token: tuple
    tensors: list


class LocalModel(nn.Module):
    """Wraps the owner's model F; see the module docstring."""

    def __init__(self, module: nn.Module, layer: str | None = None, *, name: str | None = None):
        super().__init__()
        if isinstance(module, LocalModel):
            layer = layer if layer is not None else module.layer
            module = module.module
        if not isinstance(module, nn.Module):
            hint = "; for a model file use LocalModel.load(path)" if isinstance(module, (str, os.PathLike)) else ""
            raise TypeError(f"model: expected an nn.Module or LocalModel, got {type(module).__name__}{hint}")
        self.module = module
        self.layer = layer
        self.name = name or type(module).__name__
        self._source: tuple[str, bytes] | None = None  # (kind, bytes) for non-picklable modules
        self._extractor = self._make_extractor(module, layer) if layer is not None else None
        self._checked: set[tuple[int, ...]] = set()
        self._refused: dict[tuple[int, ...], tuple[str, tuple]] = {}  # shapes F refused: why, and F's parameters then

    @staticmethod
    def _make_extractor(module, layer):
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        if isinstance(module, torch.jit.ScriptModule):
            raise ValueError("layer selection needs a Python nn.Module, not a TorchScript module")
        if type(module).__name__ == "OnnxModule":
            raise ValueError("layer selection needs a Python nn.Module; an ONNX file's F is its first output "
                             "(export the inner layer as the graph's output instead)")
        try:
            _, nodes = get_graph_node_names(module)
        except Exception as e:  # noqa: BLE001 - torch.fx cannot trace every module
            raise ValueError(f"layer={layer!r} needs a module torch.fx can trace, and this one cannot be "
                             f"({describe_error(e)}); use the output (layer=None)") from e
        if layer in _input_names(module):
            raise ValueError(f"layer {layer!r} is F's input: its features are the image itself, so the veil "
                             "would pull x~ back onto x and hide nothing; pick a layer inside F")
        if layer not in nodes:
            raise ValueError(f"layer {layer!r} not found; available: {', '.join(LocalModel.layers(module))}")
        return create_feature_extractor(module, return_nodes={layer: "out"})

    @staticmethod
    def layers(module: nn.Module) -> list[str]:
        """Node names that ``layer=`` accepts for this module (its input is not one)."""
        from torchvision.models.feature_extraction import get_graph_node_names

        inputs = _input_names(module)
        return [n for n in get_graph_node_names(module)[1] if n not in inputs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._extractor is not None:
            out = self._extractor(x)["out"]
            if not isinstance(out, torch.Tensor):
                raise LayerOutputError(f"layer {self.layer!r} of {self.name} gives a {type(out).__name__}, not a "
                                       "tensor: pick a layer whose output is a tensor")
            return out.flatten(1)
        return self.module(x)

    @property
    def device(self) -> torch.device:
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            return t.device
        return torch.device("cpu")

    def check_input(self, sample_shape: tuple[int, ...]) -> None:
        """Raise ValueError unless F takes ``[B, *sample_shape]`` and gives ``[B, n]``.

        Runs F once on a batch of two zero images (cached per shape).
        """
        sample_shape = tuple(int(s) for s in sample_shape)
        if sample_shape in self._checked:  # (asked per sample: nothing else on this path)
            return
        if sample_shape in self._refused:  # unless F changed since (model.float(), .to(), a new layer): a
            if _param_sig(self.module) == self._refused[sample_shape][1]:  # refusal must not outlive the fix
                raise ValueError(self._refused[sample_shape][0])
        try:
            self._check_input(sample_shape)
        except ValueError as e:
            self._refused[sample_shape] = (str(e), _param_sig(self.module))
            raise
        self._refused.pop(sample_shape, None)
        self._checked.add(sample_shape)

    def accepts(self, sample_shape: tuple[int, ...]) -> bool:
        """Whether F takes images of ``sample_shape`` (C, H, W) (see :meth:`check_input`)."""
        try:
            self.check_input(sample_shape)
        except ValueError:
            return False
        return True

    def _check_input(self, sample_shape: tuple[int, ...]) -> None:
        _not_meta(self)
        other = sorted({str(p.dtype) for p in self.module.parameters()
                        if p.dtype in (torch.float16, torch.bfloat16, torch.float64)})
        if other:
            raise ValueError(f"local model {self.name} has {'/'.join(other)} weights: the veil runs F in float32 "
                             "(precision='bf16' runs it under autocast); pass model.float()")
        try:
            with torch.inference_mode(False), torch.enable_grad(), frozen(self):  # as the veil runs it
                out = self(torch.zeros((2, *sample_shape), device=self.device, requires_grad=True))
        except LayerOutputError as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - any failure means "does not accept"
            raise ValueError(
                f"local model {self.name} does not accept images of shape {list(sample_shape)} "
                f"(C, H, W): {describe_error(e)}"
            ) from e
        if not isinstance(out, torch.Tensor):
            hint = _pick_hint(out)
            raise ValueError(f"local model {self.name} must return a tensor, got {_what_it_returned(out)}: wrap it "
                             "in a module whose forward returns the logits tensor"
                             f"{f' (e.g. {hint})' if hint else ''}, or pick an inner layer with layer=...")
        if not out.is_floating_point() or not out.requires_grad:
            # the veil follows dF/dx; without it the paper mode would be driven by the pixel term alone
            raise ValueError(
                f"local model {self.name}'s output ({out.dtype}) does not depend differentiably on its input "
                "(detached, constant or integer output): the veil needs F's gradient with respect to the image"
            )
        if self.layer is None and out.ndim != 2:
            raise ValueError(
                f"local model {self.name} must return logits of shape [B, n] for the default layer, "
                f"got {list(out.shape)}; pick an inner layer with layer=..."
            )
        if out.shape[0] != 2:
            raise ValueError(f"local model {self.name} mixes samples: batch of 2 gave {list(out.shape)}")
        # the same image twice must give the same output, or the same key gives another veil each time
        x = torch.rand((2, *sample_shape), generator=torch.Generator().manual_seed(0)).to(self.device) * 2 - 1
        with torch.inference_mode(False), torch.no_grad(), frozen(self):
            a, b = self(x).float(), self(x).float()
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(a.nan_to_num().abs().max())), equal_nan=True):
            raise ValueError(
                f"local model {self.name} gives different outputs for the same image (max difference "
                f"{float((a - b).abs().max()):.3g}): dropout or other randomness is on even in eval mode (a "
                "TorchScript traced in train mode keeps it), so one key would give a new veil each time; "
                "export F in eval mode")

    def fingerprint(self, fast: bool = False) -> str:
        """sha256 of what F computes besides the veil's settings: its file (when loaded from one) or its
        weights (parameters and buffers, with names, dtypes and shapes), and the layer. A retrained F
        has another fingerprint, so a cache keyed by it does not hand back the old F's veils. Kept until
        a weight or a submodule changes (tensor version counters and storage: ``load_state_dict``, an
        optimizer step, in-place ops, ``.float()``; not edits through ``.data``, which autograd does not
        see either). ``fast``: only in-place changes of the tensors hashed last are looked for (a summed
        version counter, no walk of the modules): a cache hit's check."""
        held = getattr(self, "_fingerprint", None)
        if fast and held is not None and held.token == self._version_token(held.tensors):
            return held.digest
        sig = self._weights_sig()
        if held is not None and held.sig == sig:
            self._fingerprint = held._replace(token=self._version_token(held.tensors))
            return held.digest
        tensors = list(itertools.chain(self.module.named_parameters(), self.module.named_buffers()))
        h = hashlib.sha256(repr((self.name, self.layer)).encode())
        if self._source is not None:
            h.update(self._source[0].encode() + self._source[1])
        else:  # an in-memory module: its structure and code too (same weights, a Tanh for a ReLU)
            h.update(_code_of(self.module).encode())
        for name, t in tensors:
            t = t.detach()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
        held_tensors = [t for _, t in tensors]
        self._fingerprint = _Fingerprint(sig, h.hexdigest(), self._version_token(held_tensors), held_tensors)
        return self._fingerprint.digest

    def _version_token(self, tensors: list) -> tuple:
        """Cheap (no walk of the modules): F's identity, the summed version counters of the tensors hashed
        last (they only grow, so any in-place change, load_state_dict's included, moves it), their summed
        storage addresses (``.half()`` / ``.float()`` replace ``.data``) and how many parameters,
        buffers and submodules have been assigned in this process (a swapped submodule,
        ``load_state_dict(assign=True)``: torch's registration hooks, counted from the first call)."""
        _count_registrations()
        return (id(self.module), sum(t._version for t in tensors), sum(t.data_ptr() for t in tensors),
                _REGISTRATIONS[0])

    def _weights_sig(self) -> tuple:
        """What fingerprint() is kept for: each submodule's identity, each tensor's identity, version
        counter and storage. A flat walk of the modules' own dicts (named_parameters() builds every
        name: most of a cache hit's time in VeiledDataset with a ResNet)."""
        sig: list = [self.name, self.layer]
        for m in self.module.modules():
            sig.append(id(m))
            for t in itertools.chain(m._parameters.values(), m._buffers.values()):
                if t is not None:
                    sig += (id(t), t._version, t.data_ptr())
        return tuple(sig)

    # -- loading ---------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, layer: str | None = None, *, arch: str | None = None, **kw):
        """Load F from a TorchScript ``.pt``, a state dict ``.pt`` with ``arch``, or an ``.onnx`` file
        (``kw``: options of :func:`onnx_import.load_onnx`, for ONNX files only)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LocalModel.load: expected a file path, got {type(path).__name__}")
        path = Path(path)
        if kw and path.suffix.lower() != ".onnx":
            raise TypeError(f"LocalModel.load: {', '.join(sorted(kw))} is an option of ONNX files, and "
                            f"{path.name} is not one")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give the model file (.pt or .onnx) in it")
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if path.suffix.lower() == ".onnx":
            from .onnx_import import embedded, load_onnx

            try:
                data = embedded(path)  # weights in a .onnx.data file beside it (the dynamo exporter's default)
                module = load_onnx(data, **kw)
            except Exception as e:
                raise ValueError(f"ONNX model {path.name} cannot be used: {e}") from e
            m = cls(module, layer, name=path.name)
            m._source = ("onnx", data)
            return m
        data = path.read_bytes()
        if arch is not None:
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - text, a truncated file, a whole pickled module ...
                if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
                    raise ValueError(f"{path.name} holds pickled Python objects, not only tensors (a whole "
                                     "module saved with torch.save(model)?); loading it could run code: save "
                                     "model.state_dict() or a TorchScript file instead") from e
                raise ValueError(f"{path.name} is not a state dict torch.load can read safely "
                                 f"({describe_error(e)})") from e
            try:
                module = build_arch(arch, state)
            except (RuntimeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path.name} does not fit architecture {arch!r}: {error_cause(e)}") from e
            m = cls(module, layer, name=f"{arch}:{path.name}")
            m._source = ("arch:" + arch, data)
            return m
        try:
            with _quiet_jit():
                module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as e:
            try:  # what is it then? (tensors only: nothing in the file runs)
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e2:
                if "Unsupported global" in str(e2):
                    raise ValueError(f"{path.name} holds a pickled Python module (torch.save(model)), which could "
                                     "run code when loaded: save model.state_dict() and pass arch=... (--arch), "
                                     "or save a TorchScript file (torch.jit.script(model).save(path))") from e
            except Exception:  # noqa: BLE001 - neither: say what TorchScript said
                pass
            raise ValueError(
                f"{path.name} is not a TorchScript file ({describe_error(e)}); for a state dict load it with "
                "LocalModel.load(path, arch=...) and pass that (--arch on the command line)"
            ) from e
        m = cls(module, layer, name=path.name)
        m._source = ("jit", data)
        return m

    # -- pickling (DataLoader workers) -----------------------------------------
    def __reduce__(self):
        if self._source is not None:
            return (_from_source, (self._source, self.layer, self.name, str(self.device)))
        if isinstance(self.module, torch.jit.ScriptModule):
            buf = io.BytesIO()  # an in-memory torch.jit.script(m): pickle refuses it, torch.jit.save does not
            with _quiet_jit():
                torch.jit.save(self.module, buf)  # (no _source on the copy: the same fingerprint, cache folder)
            return (_from_source, (("jit", buf.getvalue()), self.layer, self.name, str(self.device), False))
        return (LocalModel, (self.module, self.layer), {"name": self.name})


_ACCEPTED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()  # module -> shapes it passed


def check_model(model, sample_shape: tuple[int, ...]) -> None:
    """:meth:`LocalModel.check_input` for a LocalModel or an nn.Module (a module's pass is remembered
    per shape, a refusal is not: the caller may mend the model in place, ``model.float()``); other
    callables are not checked. Raises ValueError."""
    if isinstance(model, LocalModel):
        model.check_input(sample_shape)
        return
    if not isinstance(model, nn.Module):
        return
    shape = tuple(int(s) for s in sample_shape)
    with _FROZEN_LOCK:
        if shape in _ACCEPTED.get(model, ()):
            return
    LocalModel(model).check_input(shape)
    with _FROZEN_LOCK:
        _ACCEPTED.setdefault(model, set()).add(shape)


_REGISTRATIONS = [0, False]  # assignments of parameters, buffers and submodules anywhere; hooks installed


def _count_registrations() -> None:
    """Install (once) torch's global registration hooks that count assignments of parameters, buffers
    and submodules: what a fingerprint's cheap check cannot see in the tensors it holds."""
    if _REGISTRATIONS[1]:
        return
    from torch.nn.modules import module as _m

    def bump(*_args):
        _REGISTRATIONS[0] += 1

    for register in (_m.register_module_parameter_registration_hook, _m.register_module_buffer_registration_hook,
                     _m.register_module_module_registration_hook):
        register(bump)
    _REGISTRATIONS[1] = True


_LAYOUT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # module -> {shape: (ok, sig)}


def _param_sig(module: nn.Module) -> tuple:
    """What mending a refused F in place changes: its parameters' identity, dtype and device."""
    return id(module), tuple((id(t), t.dtype, t.device) for t in module.parameters())


def takes_channels_last(model, sample_shape: tuple[int, ...]) -> bool:
    """Whether F runs on a channels-last batch of ``sample_shape``, the veil's layout for 3+ channels
    (faster convolutions). A forward that flattens with ``x.view(x.size(0), -1)`` fails on one (the view
    needs contiguous memory), and that F gets the contiguous layout instead. One forward of two zero
    images per model and shape (a failure is remembered until F's parameters change dtype, device or
    identity: the model may be mended in place); other callables: True."""
    if not isinstance(model, nn.Module):
        return True
    shape = tuple(int(s) for s in sample_shape)
    with _FROZEN_LOCK:
        hit = _LAYOUT.get(model, {}).get(shape)
    if hit is not None and (hit[0] or hit[1] == _param_sig(model)):
        return hit[0]
    dev = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    x = torch.zeros((2, *shape), device=dev).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(False), torch.no_grad(), frozen(model):
            model(x)
        ok = True
    except Exception:  # noqa: BLE001 - any failure: run it contiguous (its errors, if any, are check_model's)
        ok = False
        log.info("local model %s does not run on channels-last input: veiling in the contiguous layout",
                 type(model).__name__)
    with _FROZEN_LOCK:
        _LAYOUT.setdefault(model, {})[shape] = (ok, _param_sig(model))
    return ok


def _what_it_returned(out) -> str:
    if isinstance(out, dict):
        keys = list(out)
        return f"a {type(out).__name__} with keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return type(out).__name__


def _pick_hint(out) -> str | None:
    """The line of a wrapper's forward that picks a tensor out of ``out``: its first tensor entry."""
    if isinstance(out, dict):
        key = next((k for k, v in out.items() if isinstance(v, torch.Tensor)), None)
        if key is not None:
            return f"return model(x)[{key!r}]"
    elif isinstance(out, (tuple, list)):
        i = next((i for i, v in enumerate(out) if isinstance(v, torch.Tensor)), None)
        if i is not None:
            return f"return model(x)[{i}]"
    return None


class LayerOutputError(ValueError):
    """The chosen inner layer's output is not a tensor."""


def _input_names(module: nn.Module) -> set[str]:
    """Names of ``module.forward``'s arguments: torch.fx lists them as (placeholder) layers."""
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _code_of(module: nn.Module) -> str:
    """What an in-memory module computes besides its weights: its repr (structure, activation
    modules) and, per class, the source of ``forward`` where it can be read (TorchScript: its code)."""
    parts = [repr(module)]
    seen = set()
    for m in module.modules():
        if isinstance(m, torch.jit.ScriptModule):  # one class for all scripted modules: each its own code
            with contextlib.suppress(Exception):
                parts.append(m.code)
            continue
        cls = type(m)
        if cls in seen:
            continue
        seen.add(cls)
        where = "__main__" if cls.__module__ == "__mp_main__" else cls.__module__  # a spawned worker's name for it
        with contextlib.suppress(Exception):  # built-ins and classes made in a REPL have no readable source
            parts.append(f"{where}.{cls.__qualname__}:{inspect.getsource(cls.forward)}")
    return re.sub(r" at 0x[0-9a-fA-F]+", "", "\n".join(parts))  # object addresses change per process


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ADDR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x...>" in PIL errors
_TYPED = re.compile(r"^[A-Za-z_.]*(Error|Exception):")


def error_cause(e: BaseException) -> str:
    """The line of an exception's message that says what went wrong, without terminal colours.

    Object reprs with addresses (PIL's ``<_io.BytesIO object at 0x...>``) are left out.
    TorchScript and torch.load put their cause last, after a traceback or a long preamble
    ("The following operation failed in the TorchScript interpreter. ... RuntimeError: <cause>");
    most others put it first.
    """
    lines = [ln.strip() for ln in _ADDR.sub("", _ANSI.sub("", str(e))).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    for ln in reversed(lines):
        if _TYPED.match(ln):
            return _first_sentence(ln)
    if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
        first = next((ln for ln in lines[1:] if ln), lines[0])  # state dicts: the first mismatch ...
        head, sep, names = first.partition(": ")
        if head.endswith("key(s) in state_dict") and sep:  # ... and of a key list, the first key
            keys = names.rstrip(". ").split(", ")
            return f"{head}: {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
        return first[:300]
    return _first_sentence(lines[0])


def _first_sentence(line: str, limit: int = 300) -> str:
    """``line`` up to its first sentence's end when it runs on (torch appends advice), at most ``limit``."""
    if len(line) > 160 and ". " in line[:limit]:
        line = line[: line.index(". ") + 1]
    return line[:limit]


def describe_error(e: BaseException) -> str:
    """``Type: cause`` of an exception in one line (see :func:`error_cause`)."""
    cause = error_cause(e)
    return cause if _TYPED.match(cause) else f"{type(e).__name__}: {cause}"


@contextlib.contextmanager
def _quiet_jit():
    """torch 2.10+ warns "torch.jit.load / save is deprecated" on every call: noise for a user (and once
    per DataLoader worker) about how the library moves a TorchScript F, not about their code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        yield


def _from_source(source, layer, name, device, keep_source=True):
    kind, data = source
    if kind == "onnx":
        from .onnx_import import load_onnx

        module = load_onnx(data, check=False)
    elif kind == "jit":
        with _quiet_jit():
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    else:
        module = build_arch(kind.split(":", 1)[1], torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    m = LocalModel(module.to(device), layer, name=name)
    m._source = source if keep_source else None
    return m


def build_arch(arch: str, state_dict: dict) -> nn.Module:
    """Instantiate a named architecture (``lenet5`` or any torchvision model) and load weights."""
    from . import nets

    if isinstance(state_dict, dict):
        for wrapper in ("state_dict", "model_state_dict", "model"):  # common checkpoint layouts
            if isinstance(state_dict.get(wrapper), dict):
                state_dict = state_dict[wrapper]
                break
        keys = [k for k in state_dict if isinstance(k, str)]
        if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel / DDP
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    module = nets.build(arch, state_dict)
    module.load_state_dict(state_dict)
    return module


def local_model_on(model, device: torch.device, layer: str | None = None) -> LocalModel:
    """:func:`as_local_model` on ``device``. ``nn.Module.to`` moves in place, so a caller's model on
    another device is copied there and stays where it is; one already there is used as it is."""
    local = as_local_model(model, layer)
    if torch.device(device).type != "meta":
        _not_meta(local)
    if not isinstance(model, (str, os.PathLike)) and not _all_on(local, device):
        try:
            local = copy.deepcopy(local)
        except (RuntimeError, TypeError) as e:  # e.g. weight_norm / spectral_norm weights refuse deepcopy
            warnings.warn(f"model {local.name} cannot be copied to {device} ({describe_error(e)}): moving it there "
                          "in place", stacklevel=3)
    return local.to(device)


def _not_meta(local: LocalModel) -> None:
    if any(t.is_meta for t in itertools.chain(local.module.parameters(), local.module.buffers())):
        raise ValueError(f"local model {local.name} has weights on the meta device (built but never loaded): "
                         "load its weights first (load_state_dict(..., assign=True), or to_empty() and then load)")


def _all_on(module: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``module`` is on ``device`` (``cuda``: the current one)."""
    def norm(d: torch.device) -> torch.device:  # "cuda" is the current CUDA device, "mps" is mps:0
        if d.index is not None or d.type in ("cpu", "meta"):
            return d
        return torch.device(d.type, torch.cuda.current_device() if d.type == "cuda" else 0)

    want = norm(torch.device(device))
    return all(norm(t.device) == want for t in itertools.chain(module.parameters(), module.buffers()))


def as_local_model(model, layer: str | None = None) -> LocalModel:
    """Accept an nn.Module, a LocalModel or a path, and return a LocalModel."""
    if isinstance(model, (str, os.PathLike)):
        return LocalModel.load(model, layer)
    if isinstance(model, LocalModel) and (layer is None or layer == model.layer):
        return model
    return LocalModel(model, layer)
