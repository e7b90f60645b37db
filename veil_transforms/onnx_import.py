"""Run an ONNX graph as differentiable torch ops.

Veiling needs gradients of the local model F with respect to its *input*;
onnxruntime gives none, and third-party converters break on current exports
(onnx2torch on legacy exports with de-duplicated initializers behind Identity
nodes and on opset 18+ ops, onnx2pytorch on half precision). So
:func:`load_onnx` turns the graph into :class:`OnnxModule`, a small
interpreter ``nn.Module``: every ONNX node is executed with torch ops, so
autograd flows from the output back to the input image.

Design notes
------------
* Initializers (and ``Constant`` nodes, and every node whose inputs are all
  constants, which are folded at load time) become registered buffers, so the
  weights are frozen and ``.to(device)`` works. Integer constants (shape
  tensors, indices) and small float constants also keep a CPU copy: shape
  arithmetic (``Shape``/``Gather``/``Concat``/``Reshape`` targets ...) runs on
  CPU tensors and never syncs a GPU; data tensors are never ``.item()``-ed.
* The module holds only plain Python data (a list of node dicts) plus
  buffers, so it pickles and deep-copies.
* Exports with a batch size baked in (legacy ``x.view(x.size(0), -1)`` gives
  ``Reshape[2, -1]``; dynamo exports without ``dynamic_shapes`` fix the batch)
  are made batch-agnostic: a ``Reshape``/``Expand`` whose target starts with
  the export batch while its data carries the actual batch gets the actual
  batch instead. At load time this is verified against a chunked run (batch
  sizes 1 and B0+1); if it does not hold, the module falls back to running
  the graph in chunks of the export batch (with a warning).
* Only the first graph output is returned; floating outputs come back as
  float32.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["load_onnx", "OnnxModule", "SUPPORTED_OPS"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FOLD_LIMIT = 1 << 22  # largest folded constant (elements)
_HOST_FLOAT_LIMIT = 64  # float constants up to this size also keep a CPU copy


def _onnx_dtypes() -> dict[int, torch.dtype]:
    d = {
        1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
        7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
    }
    for code, name in ((4, "uint16"), (12, "uint32"), (13, "uint64")):
        if hasattr(torch, name):
            d[code] = getattr(torch, name)
    return d


_DTYPES = _onnx_dtypes()
_FLOAT_CODES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


def _tensor_from_proto(t) -> torch.Tensor:
    from onnx import numpy_helper

    if t.data_type not in _DTYPES:
        raise ValueError(f"unsupported ONNX tensor type {t.data_type} in {t.name!r}")
    arr = numpy_helper.to_array(t)
    if t.data_type == 16:  # bfloat16 comes back as ml_dtypes.bfloat16
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True)).to(_DTYPES[t.data_type])


def _attrs(node) -> dict[str, Any]:
    import onnx

    out: dict[str, Any] = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = _tensor_from_proto(v)
        elif isinstance(v, list):
            v = [x.decode() if isinstance(x, bytes) else x for x in v]
        out[a.name] = v
    return out


# --------------------------------------------------------------------------- run context


class _Ctx:
    """Per-forward state handed to every op implementation."""

    __slots__ = ("m", "device", "batch", "subst", "record", "k", "opset")

    def __init__(self, m, device, batch, subst=False, record=None, opset=18):
        self.m, self.device, self.batch, self.subst, self.record = m, device, batch, subst, record
        self.k, self.opset = -1, opset

    def host(self, node, i, v) -> torch.Tensor:
        """Input ``i`` as a CPU tensor (constants have a CPU copy: no device sync)."""
        if v.device.type == "cpu":
            return v
        if self.m is not None:
            h = self.m._host_consts.get(node["inputs"][i])
            if h is not None:
                return h
        return v.cpu()

    def on(self, node, i, v, device) -> torch.Tensor:
        """Input ``i`` on ``device`` (constants use their registered buffer)."""
        if v.device == device:
            return v
        if self.m is not None:
            attr = self.m._const_attr.get(node["inputs"][i])
            if attr is not None:
                b = self.m._buffers[attr]
                if b.device == device and b.dtype == v.dtype:
                    return b
        return v.to(device)

    def align(self, node, vals, scalars: bool = False):
        """Move CPU tensors to the device of the first non-CPU input.

        With ``scalars`` (elementwise ops), a one-element CPU tensor (e.g. an attention
        scale computed from shapes) is passed as a 0-dim CPU scalar instead: torch reads
        it on the host, with no host-to-device copy.
        """
        dev = None
        for v in vals:
            if isinstance(v, torch.Tensor) and v.device.type != "cpu":
                dev = v.device
                break
        if dev is None:
            return list(vals)
        rank = max(v.ndim for v in vals if isinstance(v, torch.Tensor) and v.device == dev)
        out = []
        for i, v in enumerate(vals):
            if isinstance(v, torch.Tensor) and v.device != dev:
                if scalars and v.device.type == "cpu" and v.numel() == 1 and v.ndim <= rank:
                    v = v.reshape(())
                else:
                    v = self.on(node, i, v, dev)
            out.append(v)
        return out

    def batch_fix(self, shape: list[int], lead: int | None) -> list[int]:
        """Swap the export batch for the actual one in a shape target (fixed-batch exports)."""
        m = self.m
        if not self.subst or not shape or lead is None or lead != self.batch or shape[0] != m._fixed_batch:
            return shape
        if m._subst_nodes is not None and self.k not in m._subst_nodes:
            return shape
        if self.record is not None:
            self.record.add(self.k)
        return [self.batch] + list(shape[1:])


def _ints(t) -> list[int]:
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _host_ints(ctx, node, i, vals) -> list[int] | None:
    if len(vals) <= i or vals[i] is None:
        return None
    return _ints(ctx.host(node, i, vals[i]))


def _host_scalar(ctx, node, i, vals):
    if len(vals) <= i or vals[i] is None:
        return None
    t = ctx.host(node, i, vals[i])
    if t.numel() == 0:
        return None
    return t.reshape(-1)[0].item()


# --------------------------------------------------------------------------- op table

_OPS: dict[str, Callable] = {}


def _op(*names):
    def deco(fn):
        for n in names:
            _OPS[n] = fn
        return fn

    return deco


def _register_unary(name, fn):
    _OPS[name] = lambda ctx, node, v: fn(v[0])


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Neg": torch.neg,
    "Abs": torch.abs, "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
    "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh,
    "Sign": torch.sign, "Not": torch.logical_not, "IsNaN": torch.isnan, "Softsign": F.softsign,
    "Softplus": F.softplus, "Mish": F.mish, "HardSwish": F.hardswish, "Identity": lambda x: x,
}.items():
    _register_unary(_name, _fn)


def _register_binary(name, fn):
    def impl(ctx, node, v):
        a, b = ctx.align(node, v[:2], scalars=name != "MatMul")
        return fn(a, b)

    _OPS[name] = impl


def _div(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a, b):
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor, "MatMul": torch.matmul,
}.items():
    _register_binary(_name, _fn)


@_op("Mod")
def _mod(ctx, node, v):
    a, b = ctx.align(node, v[:2])
    return torch.fmod(a, b) if node["attrs"].get("fmod", 0) else torch.remainder(a, b)


@_op("PRelu")
def _prelu(ctx, node, v):
    x, s = ctx.align(node, v[:2])
    return torch.where(x < 0, x * s, x)


@_op("Sum", "Mean", "Max", "Min")
def _variadic(ctx, node, v):
    vals = ctx.align(node, v)
    fn = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum}[node["op"]]
    y = vals[0]
    for t in vals[1:]:
        y = fn(y, t)
    return y / len(vals) if node["op"] == "Mean" else y


@_op("Where")
def _where(ctx, node, v):
    c, a, b = ctx.align(node, v[:3])
    return torch.where(c.bool(), a, b)


@_op("IsInf")
def _isinf(ctx, node, v):
    x, at = v[0], node["attrs"]
    pos, neg = at.get("detect_positive", 1), at.get("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@_op("Clip")
def _clip(ctx, node, v):
    x = v[0]
    if ctx.opset < 11:
        lo, hi = node["attrs"].get("min"), node["attrs"].get("max")
    else:
        lo, hi = None, None
        for i in (1, 2):
            if len(v) > i and v[i] is not None:
                if isinstance(v[i], torch.Tensor) and v[i].requires_grad and v[i].numel() == 1:
                    bound = v[i].reshape(())  # computed from the input: the gradient flows through it too
                else:
                    bound = _host_scalar(ctx, node, i, v)
                if i == 1:
                    lo = bound
                else:
                    hi = bound
    if not x.is_floating_point():
        lo = None if lo is None else int(lo)
        hi = None if hi is None else int(hi)
    if lo is None and hi is None:
        return x
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):  # clamp takes both as tensors or neither
        lo, hi = (b if b is None or isinstance(b, torch.Tensor) else torch.tensor(b, dtype=x.dtype, device=x.device)
                  for b in (lo, hi))
    return torch.clamp(x, min=lo, max=hi)


@_op("HardSigmoid")
def _hardsigmoid(ctx, node, v):
    a, b = node["attrs"].get("alpha", 0.2), node["attrs"].get("beta", 0.5)
    return torch.clamp(v[0] * a + b, 0.0, 1.0)


@_op("LeakyRelu")
def _leaky(ctx, node, v):
    return F.leaky_relu(v[0], node["attrs"].get("alpha", 0.01))


@_op("Elu")
def _elu(ctx, node, v):
    return F.elu(v[0], node["attrs"].get("alpha", 1.0))


@_op("Celu")
def _celu(ctx, node, v):
    return F.celu(v[0], node["attrs"].get("alpha", 1.0))


@_op("Selu")
def _selu(ctx, node, v):
    a = node["attrs"].get("alpha", 1.67326319217681884765625)
    g = node["attrs"].get("gamma", 1.05070102214813232421875)
    x = v[0]
    return g * torch.where(x > 0, x, a * torch.expm1(x))


@_op("ThresholdedRelu")
def _threlu(ctx, node, v):
    x = v[0]
    return torch.where(x > node["attrs"].get("alpha", 1.0), x, torch.zeros_like(x))


@_op("Gelu")
def _gelu(ctx, node, v):
    return F.gelu(v[0], approximate=node["attrs"].get("approximate", "none"))


def _softmax_like(fn):
    def impl(ctx, node, v):
        x = v[0]
        if ctx.opset < 13:
            axis = node["attrs"].get("axis", 1) % max(x.ndim, 1)
            shape = x.shape
            y = fn(x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:])), 1)
            return y.reshape(shape)
        return fn(x, node["attrs"].get("axis", -1))

    return impl


_OPS["Softmax"] = _softmax_like(lambda x, d: torch.softmax(x, d))
_OPS["LogSoftmax"] = _softmax_like(lambda x, d: torch.log_softmax(x, d))


# ---- linear algebra / convolution


@_op("Gemm")
def _gemm(ctx, node, v):
    at = node["attrs"]
    vals = ctx.align(node, v)
    a, b = vals[0], vals[1]
    c = vals[2] if len(vals) > 2 else None
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    if at.get("transA", 0):
        a = a.t()
    if at.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (c is None or c.ndim == 1):
        return F.linear(a, b, c)
    if at.get("transB", 0):
        b = b.t()
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@_op("Einsum")
def _einsum(ctx, node, v):
    return torch.einsum(node["attrs"]["equation"], *ctx.align(node, v))


def _split_pads(totals, upper: bool):
    """ONNX's SAME_UPPER / SAME_LOWER split of each total padding: the odd one at the end / the beginning."""
    pb = [t // 2 if upper else t - t // 2 for t in totals]
    return pb, [t - b for t, b in zip(totals, pb)]


def _same_pads(sizes, kernel, strides, dilations, upper: bool):
    totals = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0) for n, k, s, d in zip(sizes, kernel, strides, dilations)]
    return _split_pads(totals, upper)


def _pads(at, sizes, kernel, strides, dilations):
    nd = len(kernel)
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(sizes, kernel, strides, dilations, auto == "SAME_UPPER")
    if auto == "VALID":
        return [0] * nd, [0] * nd
    p = list(at.get("pads", [0] * (2 * nd)))
    return p[:nd], p[nd:]


def _torch_pad(pb, pe) -> list[int]:
    out: list[int] = []
    for b, e in zip(reversed(pb), reversed(pe)):
        out += [b, e]
    return out


def _conv_args(ctx, node, v):
    """Conv / ConvTranspose inputs and attributes: x, w, bias or None, spatial dims, kernel, strides, dilations."""
    at = node["attrs"]
    vals = ctx.align(node, v)
    x, w = vals[0], vals[1]
    nd = w.ndim - 2
    return (x, w, vals[2] if len(vals) > 2 else None, nd, list(w.shape[2:]),
            list(at.get("strides", [1] * nd)), list(at.get("dilations", [1] * nd)))


@_op("Conv")
def _conv(ctx, node, v):
    at = node["attrs"]
    x, w, b, nd, kernel, s, d = _conv_args(ctx, node, v)
    pb, pe = _pads(at, x.shape[2:], kernel, s, d)
    if pb != pe:
        x = F.pad(x, _torch_pad(pb, pe))
        pb = [0] * nd
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, s, pb, d, at.get("group", 1))


@_op("ConvTranspose")
def _conv_t(ctx, node, v):
    at = node["attrs"]
    x, w, b, nd, kernel, s, d = _conv_args(ctx, node, v)
    op = list(at.get("output_padding", [0] * nd))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = fn(x, w, None, s, 0, 0, at.get("group", 1), d)
    full = [(n - 1) * st + (k - 1) * dd + 1 + o for n, st, k, dd, o in zip(x.shape[2:], s, kernel, d, op)]
    upper = at.get("auto_pad", "NOTSET") == "SAME_UPPER"
    if "output_shape" in at:
        pb, pe = _split_pads([f - t for f, t in zip(full, list(at["output_shape"])[-nd:])], upper)
    elif at.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = _split_pads([f - n * st for n, f, st in zip(x.shape[2:], full, s)], upper)
    else:
        p = list(at.get("pads", [0] * (2 * nd)))
        pb, pe = p[:nd], p[nd:]
    # output_padding adds zeros at the end; pads crop (F.pad with negative amounts)
    y = F.pad(y, _torch_pad([-p for p in pb], [o - p for o, p in zip(op, pe)]))
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * nd))
    return y


def _pool_args(at, x):
    kernel = list(at["kernel_shape"])
    nd = len(kernel)
    s = list(at.get("strides", [1] * nd))
    d = list(at.get("dilations", [1] * nd))
    pb, pe = _pads(at, x.shape[2:], kernel, s, d)
    return kernel, nd, s, d, pb, pe, bool(at.get("ceil_mode", 0))


@_op("MaxPool")
def _maxpool(ctx, node, v):
    x = v[0]
    kernel, nd, s, d, pb, pe, ceil = _pool_args(node["attrs"], x)
    if pb != pe or any(2 * p > k for p, k in zip(pb, kernel)):
        x = F.pad(x, _torch_pad(pb, pe), value=float("-inf"))
        pb = [0] * nd
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    return fn(x, kernel, s, pb, d, ceil_mode=ceil)


@_op("AveragePool")
def _avgpool(ctx, node, v):
    x = v[0]
    at = node["attrs"]
    kernel, nd, s, d, pb, pe, ceil = _pool_args(at, x)
    if any(dd != 1 for dd in d):
        raise NotImplementedError("AveragePool with dilations")
    include = bool(at.get("count_include_pad", 0))
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    if pb == pe and all(2 * p <= k for p, k in zip(pb, kernel)):
        return fn(x, kernel, s, pb, ceil, include)
    tp = _torch_pad(pb, pe)
    num = fn(F.pad(x, tp), kernel, s, 0, ceil, True)
    if include:
        return num
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    return num / fn(F.pad(ones, tp), kernel, s, 0, ceil, True)


@_op("GlobalAveragePool")
def _gap(ctx, node, v):
    x = v[0]
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


def _extreme(x: torch.Tensor, dims, keepdim: bool, largest: bool = True) -> torch.Tensor:
    """max (min) over ``dims`` whose gradient goes to the first extreme element in row-major order, as
    PyTorch's ``x.max(dim)``, ``adaptive_max_pool2d`` and ``max_pool2d`` route it (which export to
    ReduceMax / GlobalMaxPool), not split evenly over ties as ``amax`` does: images with flat regions
    tie often, and the split gradient moved the veil by up to 20 grey levels in 50 steps."""
    dims = sorted(d % x.ndim for d in dims)
    rest = [d for d in range(x.ndim) if d not in dims]
    y = x.permute(*rest, *dims).reshape(*[x.shape[d] for d in rest], -1)
    out = (y.max(dim=-1) if largest else y.min(dim=-1)).values
    if keepdim:
        out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.ndim)])
    return out


@_op("GlobalMaxPool")
def _gmp(ctx, node, v):
    x = v[0]
    return _extreme(x, range(2, x.ndim), True)


@_op("BatchNormalization")
def _bn(ctx, node, v):
    x, scale, bias, mean, var = ctx.align(node, v[:5])
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node["attrs"].get("epsilon", 1e-5))


@_op("InstanceNormalization")
def _instnorm(ctx, node, v):
    x, scale, bias = ctx.align(node, v[:3])
    return F.instance_norm(x, weight=scale, bias=bias, eps=node["attrs"].get("epsilon", 1e-5))


@_op("LayerNormalization")
def _layernorm(ctx, node, v):
    at = node["attrs"]
    vals = ctx.align(node, v)
    x, scale = vals[0], vals[1]
    bias = vals[2] if len(vals) > 2 else None
    eps = at.get("epsilon", 1e-5)
    axis = at.get("axis", -1) % x.ndim
    ns = tuple(x.shape[axis:])
    dt = x.dtype
    if at.get("stash_type", 1) == 1 and dt in (torch.float16, torch.bfloat16):
        x = x.float()
    dims = tuple(range(axis, x.ndim))
    want_stats = len(node["outputs"]) > 1 and any(node["outputs"][1:])
    if want_stats:
        mean = x.mean(dim=dims, keepdim=True)
        inv = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
        y = (x - mean) * inv
    else:
        y = F.layer_norm(x, ns, None, None, eps)
    y = y.to(dt) * scale
    if bias is not None:
        y = y + bias
    if want_stats:
        return y, mean, inv
    return y


@_op("GroupNormalization")
def _groupnorm(ctx, node, v):
    at = node["attrs"]
    x, scale, bias = ctx.align(node, v[:3])
    g = at["num_groups"]
    c = x.shape[1]
    if scale.numel() != c:
        scale = scale.repeat_interleave(c // g)
        bias = bias.repeat_interleave(c // g)
    return F.group_norm(x, g, scale, bias, at.get("epsilon", 1e-5))


@_op("LRN")
def _lrn(ctx, node, v):
    at = node["attrs"]
    x = v[0]
    size = at["size"]
    alpha, beta, bias = at.get("alpha", 1e-4), at.get("beta", 0.75), at.get("bias", 1.0)
    n, c = x.shape[0], x.shape[1]
    sq = (x * x).reshape(n, 1, c, -1)
    before = (size - 1) // 2
    sq = F.pad(sq, (0, 0, before, size - 1 - before))
    s = F.avg_pool2d(sq, (size, 1), stride=1) * size
    return x / (bias + alpha / size * s.reshape(x.shape)) ** beta


@_op("LpNormalization")
def _lpnorm(ctx, node, v):
    at = node["attrs"]
    x = v[0]
    return x / torch.linalg.vector_norm(x, ord=at.get("p", 2), dim=at.get("axis", -1), keepdim=True)


# ---- shape / indexing


@_op("Shape")
def _shape(ctx, node, v):
    at = node["attrs"]
    dims = list(v[0].shape)
    start, end = at.get("start", 0), at.get("end")
    dims = dims[start:end] if end is not None else dims[start:]
    return torch.tensor(dims, dtype=torch.int64)


@_op("Size")
def _size(ctx, node, v):
    return torch.tensor(v[0].numel(), dtype=torch.int64)


@_op("Constant")
def _constant(ctx, node, v):
    at = node["attrs"]
    if "value" in at:
        return at["value"]
    if "value_float" in at:
        return torch.tensor(at["value_float"], dtype=torch.float32)
    if "value_floats" in at:
        return torch.tensor(at["value_floats"], dtype=torch.float32)
    if "value_int" in at:
        return torch.tensor(at["value_int"], dtype=torch.int64)
    if "value_ints" in at:
        return torch.tensor(at["value_ints"], dtype=torch.int64)
    raise NotImplementedError("Constant without a dense value")


@_op("ConstantOfShape")
def _const_of_shape(ctx, node, v):
    shape = _host_ints(ctx, node, 0, v)
    val = node["attrs"].get("value")
    if val is None:
        val = torch.zeros(1, dtype=torch.float32)
    dev = ctx.device if val.is_floating_point() else torch.device("cpu")
    return torch.full(shape, val.reshape(-1)[0].item(), dtype=val.dtype, device=dev)


@_op("Cast")
def _cast(ctx, node, v):
    return v[0].to(_DTYPES[node["attrs"]["to"]])


@_op("CastLike")
def _castlike(ctx, node, v):
    return v[0].to(v[1].dtype)


@_op("Dropout")
def _dropout(ctx, node, v):
    x = v[0]
    if len(node["outputs"]) > 1 and node["outputs"][1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@_op("Reshape")
def _reshape(ctx, node, v):
    x = v[0]
    shape = _host_ints(ctx, node, 1, v)
    if not node["attrs"].get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    shape = ctx.batch_fix(shape, x.shape[0] if x.ndim else None)
    return x.reshape(shape)


@_op("Flatten")
def _flatten(ctx, node, v):
    x = v[0]
    axis = node["attrs"].get("axis", 1)
    if axis < 0:
        axis += x.ndim
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@_op("Transpose")
def _transpose(ctx, node, v):
    x = v[0]
    perm = node["attrs"].get("perm")
    return x.permute(*(perm if perm is not None else reversed(range(x.ndim))))


@_op("Concat")
def _concat(ctx, node, v):
    vals = ctx.align(node, [t for t in v if t is not None])
    axis = node["attrs"]["axis"]
    if ctx.subst and ctx.m._fixed_batch == 1 and vals[0].ndim and axis % vals[0].ndim:
        # batch-1 export: a constant [1, ...] part (e.g. a class token) was not expanded
        lead = {t.shape[0] for t in vals}
        if lead == {1, ctx.batch} and ctx.batch_fix([1], ctx.batch) == [ctx.batch]:
            vals = [t.expand(ctx.batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in vals]
    return torch.cat(vals, dim=axis)


@_op("Split")
def _split(ctx, node, v):
    x = v[0]
    at = node["attrs"]
    axis = at.get("axis", 0)
    split = at.get("split")
    if split is None:
        split = _host_ints(ctx, node, 1, v)
    n = len(node["outputs"])
    if not split:
        dim = x.shape[axis]
        n = at.get("num_outputs", n)
        size = -(-dim // n) if "num_outputs" in at else dim // n
        split = [size] * (n - 1) + [dim - size * (n - 1)]
    return tuple(torch.split(x, list(split), dim=axis))


def _axes_arg(ctx, node, v, since: int):
    if ctx.opset >= since:
        return _host_ints(ctx, node, 1, v)
    return node["attrs"].get("axes")


@_op("Squeeze")
def _squeeze(ctx, node, v):
    x = v[0]
    axes = _axes_arg(ctx, node, v, 13)
    if axes is None:
        return x.squeeze()
    axes = sorted((a % x.ndim for a in axes), reverse=True)
    for a in axes:
        x = x.squeeze(a)
    return x


@_op("Unsqueeze")
def _unsqueeze(ctx, node, v):
    x = v[0]
    axes = _axes_arg(ctx, node, v, 13)
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _slice_axis(dim: int, start: int, end: int, step: int):
    """Python slice (on the axis, or on the flipped axis when ``step < 0``) per ONNX clamping."""
    if step > 0:
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        return False, slice(start, end, step)
    start = min(max(start + dim if start < 0 else start, 0), dim - 1)
    end = min(max(end + dim if end < 0 else end, -1), dim - 1)
    return True, slice(dim - 1 - start, max(dim - 1 - end, 0), -step)


@_op("Slice")
def _slice(ctx, node, v):
    x = v[0]
    if ctx.opset < 10:
        at = node["attrs"]
        starts, ends = at["starts"], at["ends"]
        axes, steps = at.get("axes"), None
    else:
        starts, ends = _host_ints(ctx, node, 1, v), _host_ints(ctx, node, 2, v)
        axes, steps = _host_ints(ctx, node, 3, v), _host_ints(ctx, node, 4, v)
    axes = list(range(len(starts))) if axes is None else [a % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    idx: list[Any] = [slice(None)] * x.ndim
    flips = []
    for a, st, en, sp in zip(axes, starts, ends, steps):
        flip, sl = _slice_axis(x.shape[a], st, en, sp)
        if flip:
            flips.append(a)
        idx[a] = sl
    if flips:
        x = x.flip(flips)
    return x[tuple(idx)]


@_op("Gather")
def _gather(ctx, node, v):
    x, idx = v[0], v[1]
    axis = node["attrs"].get("axis", 0) % x.ndim
    dim = x.shape[axis]
    if idx.ndim == 0 and idx.device.type == "cpu":
        i = int(idx)
        return x.select(axis, i + dim if i < 0 else i)
    if idx.device != x.device:
        idx = ctx.on(node, 1, idx, x.device) if x.device.type != "cpu" else idx.cpu()
    idx = torch.where(idx < 0, idx + dim, idx)
    out = x.index_select(axis, idx.reshape(-1).long())
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


@_op("GatherElements")
def _gather_el(ctx, node, v):
    x, idx = v[0], v[1]
    axis = node["attrs"].get("axis", 0) % x.ndim
    if idx.device != x.device:
        idx = ctx.on(node, 1, idx, x.device)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx.long())


@_op("GatherND")
def _gather_nd(ctx, node, v):
    x, idx = v[0], v[1]
    if idx.device != x.device:
        idx = ctx.on(node, 1, idx, x.device)
    idx = idx.long()
    b = node["attrs"].get("batch_dims", 0)
    k = idx.shape[-1]
    bshape = tuple(x.shape[:b])
    nb = math.prod(bshape)
    xd = x.reshape(nb, *x.shape[b:])
    ii = idx.reshape(nb, *idx.shape[b:])
    ar = torch.arange(nb, device=x.device).reshape(nb, *([1] * (ii.ndim - 2)))
    out = xd[(ar,) + tuple(ii[..., j] for j in range(k))]
    return out.reshape(*bshape, *idx.shape[b:-1], *x.shape[b + k:])


@_op("Expand")
def _expand(ctx, node, v):
    x = v[0]
    shape = _host_ints(ctx, node, 1, v)
    if len(shape) >= x.ndim and shape:
        d0 = x.shape[0] if len(shape) == x.ndim else 1
        fixed = ctx.m._fixed_batch if ctx.m is not None else None
        if d0 == ctx.batch or (d0 == 1 and fixed is not None and fixed != 1):
            shape = ctx.batch_fix(shape, ctx.batch)
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


@_op("Tile")
def _tile(ctx, node, v):
    return v[0].repeat(_host_ints(ctx, node, 1, v))


@_op("Pad")
def _pad(ctx, node, v):
    x = v[0]
    at = node["attrs"]
    mode = at.get("mode", "constant")
    nd = x.ndim
    if ctx.opset < 11:
        pads, value, axes = list(at["pads"]), at.get("value", 0.0), list(range(nd))
    else:
        pads = _host_ints(ctx, node, 1, v)
        value = _host_scalar(ctx, node, 2, v) or 0
        axes = _host_ints(ctx, node, 3, v)
        axes = list(range(nd)) if axes is None else [a % nd for a in axes]
    pb, pe = [0] * nd, [0] * nd
    for j, a in enumerate(axes):
        pb[a], pe[a] = pads[j], pads[len(axes) + j]
    nz = [i for i in range(nd) if pb[i] or pe[i]]
    if not nz:
        return x
    first = nz[0]
    if mode == "constant":
        return F.pad(x, _torch_pad(pb[first:], pe[first:]), value=value if x.is_floating_point() else int(value))
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    if first < 2 or nd < 3:
        raise NotImplementedError(f"Pad mode {mode!r} on batch/channel dims")
    return F.pad(x, _torch_pad(pb[2:], pe[2:]), mode=tmode)


@_op("Range")
def _range(ctx, node, v):
    start, limit, delta = (ctx.host(node, i, v[i]) for i in range(3))
    dev = ctx.device if start.is_floating_point() else torch.device("cpu")
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=dev)


@_op("Trilu")
def _trilu(ctx, node, v):
    k = _host_scalar(ctx, node, 1, v) or 0
    return torch.triu(v[0], int(k)) if node["attrs"].get("upper", 1) else torch.tril(v[0], int(k))


@_op("CumSum")
def _cumsum(ctx, node, v):
    x = v[0]
    axis = int(_host_scalar(ctx, node, 1, v))
    at = node["attrs"]
    if at.get("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if at.get("exclusive", 0):
        y = y - x
    return y.flip(axis) if at.get("reverse", 0) else y


@_op("TopK")
def _topk(ctx, node, v):
    at = node["attrs"]
    k = int(_host_scalar(ctx, node, 1, v)) if ctx.opset >= 10 else at["k"]
    vals, idx = torch.topk(v[0], k, dim=at.get("axis", -1), largest=bool(at.get("largest", 1)),
                           sorted=bool(at.get("sorted", 1)))
    return vals, idx


def _arg(fn):
    def impl(ctx, node, v):
        x = v[0]
        at = node["attrs"]
        axis, keep = at.get("axis", 0), bool(at.get("keepdims", 1))
        if at.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)
        return fn(x, axis, keepdim=keep)

    return impl


_OPS["ArgMax"] = _arg(torch.argmax)
_OPS["ArgMin"] = _arg(torch.argmin)


def _prod(x, dim, keepdim):
    for a in sorted(dim, reverse=True):
        x = x.prod(dim=a, keepdim=keepdim)
    return x


_REDUCE = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: _extreme(x, d, k) if x.numel() else x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: _extreme(x, d, k, largest=False) if x.numel() else x.amin(dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(x.sum(dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _reduce(ctx, node, v):
    x = v[0]
    at = node["attrs"]
    since = 13 if node["op"] == "ReduceSum" else 18
    axes = _axes_arg(ctx, node, v, since)
    keep = bool(at.get("keepdims", 1))
    if not axes:
        if at.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    if x.ndim == 0:
        return x
    return _REDUCE[node["op"]](x, tuple(a % x.ndim for a in axes), keep)


for _name in _REDUCE:
    _OPS[_name] = _reduce


@_op("DepthToSpace")
def _d2s(ctx, node, v):
    x = v[0]
    b = node["attrs"]["blocksize"]
    n, c, h, w = x.shape
    if node["attrs"].get("mode", "DCR") == "CRD":
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@_op("SpaceToDepth")
def _s2d(ctx, node, v):
    x = v[0]
    b = node["attrs"]["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@_op("Resize", "Upsample")
def _resize(ctx, node, v):
    x = v[0]
    at = node["attrs"]
    nd = x.ndim - 2
    if node["op"] == "Upsample":
        scales = at.get("scales") or [float(s) for s in ctx.host(node, 1, v[1]).tolist()]
        sizes = None
        ctm = "asymmetric"
        nearest_mode = "floor"
    elif ctx.opset < 11:
        scales, sizes = [float(s) for s in ctx.host(node, 1, v[1]).tolist()], None
        ctm, nearest_mode = "asymmetric", "floor"
    else:
        sc = ctx.host(node, 2, v[2]) if len(v) > 2 and v[2] is not None else None
        scales = [float(s) for s in sc.tolist()] if sc is not None and sc.numel() else None
        sizes = _host_ints(ctx, node, 3, v)
        ctm = at.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = at.get("nearest_mode", "round_prefer_floor")
        if "axes" in at:
            raise NotImplementedError("Resize with axes")
    mode = at.get("mode", "nearest")
    kw: dict[str, Any] = {}
    if sizes:
        kw["size"] = list(sizes[2:])
    else:
        if any(s != 1.0 for s in scales[:2]):
            raise NotImplementedError("Resize of batch/channel dims")
        kw["scale_factor"] = list(scales[2:])
        kw["recompute_scale_factor"] = False
    if mode == "nearest":
        if ctm == "asymmetric" and nearest_mode == "floor":
            tmode = "nearest"
        elif ctm in ("half_pixel", "pytorch_half_pixel") and nearest_mode.startswith("round"):
            tmode = "nearest-exact"
        else:
            raise NotImplementedError(f"Resize nearest with {ctm}/{nearest_mode}")
        return F.interpolate(x, mode=tmode, **kw)
    if mode == "linear":
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise NotImplementedError(f"Resize linear with {ctm}")
        tmode = ("linear", "bilinear", "trilinear")[nd - 1]
        return F.interpolate(x, mode=tmode, align_corners=ctm == "align_corners",
                             antialias=bool(at.get("antialias", 0)) and nd == 2, **kw)
    if mode == "cubic" and nd == 2 and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        if at.get("cubic_coeff_a", -0.75) != -0.75 or at.get("exclude_outside", 0):
            raise NotImplementedError("Resize cubic with cubic_coeff_a != -0.75 or exclude_outside")
        return F.interpolate(x, mode="bicubic", align_corners=ctm == "align_corners",
                             antialias=bool(at.get("antialias", 0)), **kw)
    raise NotImplementedError(f"Resize mode {mode!r} with {ctm}")


SUPPORTED_OPS = frozenset(_OPS)


def _unsupported_feature(node) -> str | None:
    """Features of supported op types that the interpreter does not implement."""
    op = node.op_type
    names = {a.name: a for a in node.attribute}
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "MaxPool (Indices output)"
    if op == "BatchNormalization" and "training_mode" in names and names["training_mode"].i:
        return "BatchNormalization (training_mode=1)"
    if op == "Constant" and not set(names) & {"value", "value_float", "value_floats", "value_int", "value_ints"}:
        return "Constant (sparse or string value)"
    if any(a.type in (5, 10) for a in node.attribute):  # GRAPH / GRAPHS attributes
        return f"{op} (subgraph)"
    return None


# --------------------------------------------------------------------------- module


def _sanitize(name: str, used: set[str]) -> str:
    base = "c_" + "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)[:60]
    out, k = base, 1
    while out in used:
        out, k = f"{base}_{k}", k + 1
    used.add(out)
    return out


class OnnxModule(nn.Module):
    """Interpreter of one ONNX graph; ``forward(x)`` returns the first graph output."""

    def __init__(self, model, input_name: str, input_dtype: torch.dtype, input_shape: list[int | None] | None):
        super().__init__()
        graph = model.graph
        self._opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 18)
        self._input_name = input_name
        self._input_dtype = input_dtype
        self._input_shape = input_shape
        self._output_name = graph.output[0].name
        self._fixed_batch = input_shape[0] if input_shape else None
        self._subst_nodes: frozenset[int] | None = None  # None: decide dynamically
        self._chunk: int | None = None  # run in chunks of this size (fallback)

        consts: dict[str, torch.Tensor] = {t.name: _tensor_from_proto(t) for t in graph.initializer}
        consts.pop(input_name, None)
        nodes: list[dict] = []
        fold_ctx = _Ctx(None, torch.device("cpu"), None, opset=self._opset)
        for n in graph.node:
            nd = {"op": n.op_type, "inputs": tuple(n.input), "outputs": tuple(n.output), "attrs": _attrs(n)}
            ins = [i for i in n.input if i]
            if all(i in consts for i in ins):
                try:
                    with torch.no_grad():
                        out = _OPS[n.op_type](fold_ctx, nd, [consts[i] if i else None for i in n.input])
                    out = out if isinstance(out, (tuple, list)) else (out,)
                    if sum(t.numel() for t in out) <= _FOLD_LIMIT or n.op_type in ("Constant", "Identity"):
                        for name, t in zip(n.output, out):
                            if name:
                                consts[name] = t
                        continue
                except Exception:  # leave it to run time (the load-time checks will tell)
                    pass
            nodes.append(nd)

        used = {i for nd in nodes for i in nd["inputs"] if i} | {self._output_name}
        consts = {k: t for k, t in consts.items() if k in used}
        # free intermediate values after their last use
        last: dict[str, int] = {}
        for k, nd in enumerate(nodes):
            for i in nd["inputs"]:
                if i and i not in consts:
                    last[i] = k
        for k, nd in enumerate(nodes):
            nd["free"] = tuple(i for i in dict.fromkeys(nd["inputs"]) if i and last.get(i) == k and i != self._output_name)
        self._nodes = nodes

        attr_names: set[str] = set()
        self._const_attr: dict[str, str] = {}
        self._host_consts: dict[str, torch.Tensor] = {}
        seed = set()
        by_id: dict[int, str] = {}  # aliases (Identity on an initializer) share one buffer
        for name, t in consts.items():
            attr = by_id.get(id(t))
            if attr is None:
                attr = by_id[id(t)] = _sanitize(name, attr_names)
                self.register_buffer(attr, t.detach())
            self._const_attr[name] = attr
            if not t.is_floating_point() or t.numel() <= _HOST_FLOAT_LIMIT:
                self._host_consts[name] = t
            if not t.is_floating_point():
                seed.add(name)
        self._host_seed = frozenset(seed)

    # ---- running

    def _run(self, x: torch.Tensor, record: set | None = None) -> torch.Tensor:
        ctx = _Ctx(self, x.device, x.shape[0], opset=self._opset, record=record,
                   subst=self._fixed_batch is not None and x.shape[0] != self._fixed_batch)
        env: dict[str, Any] = {}
        for name, attr in self._const_attr.items():
            env[name] = self._host_consts[name] if name in self._host_seed else self._buffers[attr]
        env[self._input_name] = x.to(self._input_dtype)
        for k, node in enumerate(self._nodes):
            ctx.k = k
            vals = [env[i] if i else None for i in node["inputs"]]
            try:
                out = _OPS[node["op"]](ctx, node, vals)
            except Exception as e:
                raise RuntimeError(f"ONNX node #{k} {node['op']} ({', '.join(node['outputs'])}): {e}") from e
            if isinstance(out, (tuple, list)):
                for name, t in zip(node["outputs"], out):
                    if name:
                        env[name] = t
            else:
                env[node["outputs"][0]] = out
            for name in node["free"]:
                env.pop(name, None)
        y = env[self._output_name]
        if y.is_floating_point() and y.dtype != torch.float32:
            y = y.float()
        return y

    def _run_chunked(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        outs = []
        for s in range(0, x.shape[0], chunk):
            c = x[s:s + chunk]
            n = c.shape[0]
            if n < chunk:  # pad with detached copies: they get no gradient, outputs dropped
                c = torch.cat([c, c[-1:].detach().expand(chunk - n, *c.shape[1:])])
            outs.append(self._run(c)[:n])
        return torch.cat(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._chunk is not None and x.shape[0] != self._chunk:
            return self._run_chunked(x, self._chunk)
        return self._run(x)

    def extra_repr(self) -> str:
        ops = sorted({n["op"] for n in self._nodes})
        return (f"opset={self._opset}, nodes={len(self._nodes)}, input={self._input_name!r} "
                f"{self._input_shape}, fixed_batch={self._fixed_batch}, chunk={self._chunk}, ops={ops}")


# --------------------------------------------------------------------------- loading + checks


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((y - ref).abs().max()) / max(scale, 1e-12) if ref.numel() else 0.0


def embedded(path: str | os.PathLike) -> bytes:
    """The ONNX file at ``path`` as one serialized model, its external data (the ``.onnx.data`` file
    ``torch.onnx.export(..., dynamo=True)`` writes beside it by default) read into it: bytes that load,
    hash and pickle (DataLoader workers) without the file beside them. A file without external data is
    returned as it is."""
    import onnx
    from onnx import external_data_helper

    raw = Path(path).read_bytes()
    try:
        model = onnx.load_model_from_string(raw)
    except Exception:  # noqa: BLE001 - load_onnx names what is wrong with it
        return raw
    if not any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        return raw
    try:
        external_data_helper.load_external_data_for_model(model, str(Path(path).parent))
    except Exception as e:
        raise ValueError(f"its weights are in an external data file that cannot be read beside it "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return model.SerializeToString()


def _read(src):
    import onnx

    if isinstance(src, (bytes, bytearray, memoryview)):
        raw, path = bytes(src), None
        try:
            model = onnx.load_model_from_string(raw)
        except Exception as e:
            raise ValueError(f"not a valid ONNX model ({type(e).__name__}: {e})") from None
    else:
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such ONNX file: {path}")
        raw = None
        try:
            model = onnx.load(path)
        except Exception as e:
            raise ValueError(f"not a valid ONNX model ({type(e).__name__}: {e})") from None
    if not model.ir_version or not model.graph.node or not model.graph.output:
        raise ValueError("not a valid ONNX model (no IR version, nodes or outputs)")
    if len(model.functions):
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:
            raise ValueError(f"cannot inline the model's local functions ({e})") from None
    return model, raw, path


def _check_ops(model) -> None:
    bad: dict[str, None] = {}
    for n in model.graph.node:
        if n.domain not in _DEFAULT_DOMAINS:
            bad[f"{n.op_type} ({n.domain})"] = None
        elif n.op_type not in _OPS:
            bad[n.op_type] = None
        else:
            reason = _unsupported_feature(n)
            if reason:
                bad[reason] = None
    if bad:
        msg = "unsupported ONNX ops: " + ", ".join(bad)
        if any("(com.microsoft)" in b for b in bad):
            msg += " (onnxruntime-optimized graph? export the original model instead)"
        raise ValueError(msg)


def _graph_input(model):
    init = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in init]
    desc = []
    for i in real:
        tt = i.type.tensor_type if i.type.HasField("tensor_type") else None
        desc.append(f"{i.name!r} ({_FLOAT_CODES.get(tt.elem_type, 'non-float') if tt is not None else 'non-tensor'})")
    floats = [i for i in real if i.type.HasField("tensor_type") and i.type.tensor_type.elem_type in _FLOAT_CODES]
    if len(real) == 1 and not floats:
        raise ValueError(f"the graph's input {desc[0]} is not floating point: the veil follows F's gradient with "
                         "respect to the image, so export F taking float images (normalized to [-1, 1])")
    if len(real) != 1 or len(floats) != 1:
        raise ValueError(f"expected exactly one float graph input, found {len(real)}: {', '.join(desc) or 'none'}")
    inp = floats[0]
    tt = inp.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    return inp.name, _DTYPES[tt.elem_type], tt.elem_type, shape


def _verify_batching(m: OnnxModule, shape: list[int], tol: float) -> None:
    """Check that other batch sizes match a chunked run; otherwise fall back to chunking."""
    b0 = m._fixed_batch
    chunk = b0 or 1
    gen = torch.Generator().manual_seed(1)
    record: set[int] = set()
    m._subst_nodes = None
    problem = None
    with torch.no_grad():
        for b in sorted({1, (b0 or 2) + 1} - {b0}):
            x = torch.randn(b, *shape[1:], generator=gen)
            try:
                ref = m._run_chunked(x, chunk)
            except Exception as e:
                raise ValueError(f"the graph fails at its own batch size: {e}") from None
            try:
                y = m._run(x, record=record)
            except Exception as e:
                problem = f"batch {b} fails ({str(e).splitlines()[0][:200]})"
                break
            if tuple(y.shape) != tuple(ref.shape) or not torch.isfinite(y).all() or _rel_err(y, ref) > tol:
                problem = f"batch {b} mixes samples"
                break
    if problem is None:
        m._subst_nodes = frozenset(record)
        return
    m._chunk = chunk
    warnings.warn(f"ONNX graph only runs at a batch size of {chunk} ({problem}); running it in chunks of "
                  f"{chunk} (slower). Re-export with a dynamic batch dimension for speed.", stacklevel=3)


def load_onnx(src: bytes | str | os.PathLike, *, check: bool = True) -> torch.nn.Module:
    """Load an ONNX model as a differentiable torch module (``forward(x) -> first output``).

    ``src`` is the serialized model or a path. With ``check`` (default), the model
    is validated with ``onnx.checker``, compared with onnxruntime on a random
    batch, and must give a finite, non-zero input gradient. Problems raise
    ``ValueError`` with a one-line reason. Unsupported ops always raise.
    """
    try:
        import onnx  # noqa: F401
        import onnx.inliner  # noqa: F401
    except ImportError as e:  # pragma: no cover
        raise ImportError("load_onnx needs the 'onnx' package: pip install onnx onnxruntime") from e

    model, raw, path = _read(src)
    _check_ops(model)
    if check:
        try:
            if model.ByteSize() < 2_000_000_000 or path is None:
                onnx.checker.check_model(model)
            else:
                onnx.checker.check_model(path)
        except Exception as e:
            raise ValueError(f"onnx.checker rejects the model: {str(e).strip().splitlines()[0][:300]}") from None
    name, dtype, elem, shape = _graph_input(model)
    try:
        m = OnnxModule(model, name, dtype, shape)
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"cannot build the graph: {e}") from None
    m.eval()
    if len(model.graph.output) > 1:  # an nn.Module returning a tuple is refused; a file's first output is used
        names = ", ".join(repr(o.name) for o in model.graph.output[:5]) + (", ..." if len(model.graph.output) > 5 else "")
        warnings.warn(f"the ONNX model has {len(model.graph.output)} outputs ({names}): F is the first, "
                      f"{model.graph.output[0].name!r}; if the veil should match another (the logits), export F "
                      "with that one output", stacklevel=3)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    static = shape is not None and len(shape) > 0 and all(d is not None for d in shape[1:])
    if check and not static:
        raise ValueError(f"input {name!r} has an unknown or symbolic non-batch shape {shape}; "
                         "export it with a fixed input size (or pass check=False)")
    b = (shape[0] if shape and shape[0] else 2) if static else 0
    if check:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, *shape[1:], generator=gen)
        try:
            with torch.no_grad():
                y = m(x)
        except Exception as e:
            raise ValueError(f"running the graph failed: {str(e).splitlines()[0][:300]}") from None
        if not y.is_floating_point():
            raise ValueError(f"the first graph output is not floating point ({y.dtype})")
        _check_parity(raw if raw is not None else path, name, elem, x, y, tol)
    if static:
        _verify_batching(m, shape, tol)
    if check:
        x = torch.randn(b, *shape[1:], generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        y = m(x)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (g,) = torch.autograd.grad((y * w).sum(), x, allow_unused=True)
        if g is None or not torch.isfinite(g).all():
            raise ValueError("the input gradient is not finite" if g is not None else "the output does not depend on the input")
        if not g.abs().max() > 0:
            raise ValueError("the input gradient is identically zero")
    return m


def _check_parity(src, name, elem, x, y, tol) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn("onnxruntime is not installed: skipping the ONNX parity check", stacklevel=3)
        return
    def unsupported(e: Exception) -> bool:  # onnxruntime lacks a kernel, not: the file is invalid (types)
        return type(e).__name__ == "NotImplemented" or "not supported" in str(e).lower()

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # a one-off check: no thread pool spinning beside torch
    so.log_severity_level = 4  # its own log line would repeat the error below
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        feed = x.numpy().astype(np.dtype(_FLOAT_CODES[elem]) if elem != 16 else np.float32)
        ref = torch.from_numpy(np.asarray(sess.run(None, {name: feed})[0], dtype=np.float32))
    except Exception as e:  # noqa: BLE001
        why = str(e).strip().splitlines()[0][:200]
        if not unsupported(e):
            raise ValueError(f"onnxruntime cannot run the model: {why}") from None
        # a kernel onnxruntime lacks (dilated SAME_UPPER convs, float64 convs): the file may be valid and
        # the library's interpreter exact, so say so and go on
        warnings.warn(f"onnxruntime cannot run the model ({why}), so the library's interpreter is not compared "
                      "with it; the gradient checks still run", stacklevel=3)
        return
    if tuple(ref.shape) != tuple(y.shape):
        raise ValueError(f"output shape {tuple(y.shape)} differs from onnxruntime's {tuple(ref.shape)}")
    err = _rel_err(y.float(), ref)
    if not err < tol:
        raise ValueError(f"output differs from onnxruntime: max abs error {err:.2e} of the output scale (> {tol:g})")
