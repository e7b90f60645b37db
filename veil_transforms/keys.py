"""Secret keys and the per-sample randomness derived from them.

Every random choice of the veil (the flip mask) is a pure function of the
owner's secret key and the sample's own content:

    digest  = HMAC-SHA256(key, "veil-sample" || shape (int64) || normalized float32 bytes)
    stream  = SHAKE-256("veil-mask" || key || digest) -> one little-endian uint32 per value
              -> uniforms u / 2**32 in [0, 1) (float32)

So the same key and image always give the same veil (re-veiling leaks nothing
new), a different key gives an unrelated mask, and without the key the mask is
a cryptographic pseudo-random stream. Masks are never stored; they are
re-derived on demand. There is no default seed: with no key one is drawn from
:mod:`secrets`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_WARNED_MODES: set[str] = set()  # key files already reported as readable by others

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh 32-byte secret key from the OS's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


_HEX_TEXT = re.compile(rb"\s*(?:[0-9a-fA-F]{2}){16,}\s*")


def as_key(key: bytes | str | os.PathLike | None) -> bytes:
    """Normalise a user-supplied key: bytes, a hex string, or None (draws a new key).

    Paths are not accepted here on purpose; use :func:`read_key_file`.
    """
    if key is None:
        return new_key()
    if isinstance(key, (bytes, bytearray)):
        key = bytes(key)
        if _HEX_TEXT.fullmatch(key):
            # open("owner.key", "rb").read() of a key file: using the text's bytes as the key would
            # silently veil with another key than veil-shard's
            raise ValueError(
                "key: these bytes are the hex text of a key (a key file's contents); pass "
                "keys.read_key_file(path), or the text as a str"
            )
    elif isinstance(key, str):
        try:
            key = bytes.fromhex(key.strip())
        except ValueError:
            hint = (f"; {key!r} looks like a file name: pass keys.read_key_file({key!r})"
                    if os.path.sep in key or "." in key else "")
            raise ValueError(f"key: a str key must be hex (e.g. from new_key().hex()){hint}") from None
    elif isinstance(key, os.PathLike):
        raise TypeError(f"key: got a path ({os.fspath(key)!r}); pass keys.read_key_file(path), the key it holds")
    else:
        raise TypeError(f"key: expected bytes, a hex str or None, got {type(key).__name__}")
    if len(key) < 16:
        raise ValueError(f"key: must be at least 16 bytes of secret material, got {len(key)}")
    return key


def read_key_file(path: str | os.PathLike, *, create: bool = False) -> bytes:
    """Read a hex key file; with ``create=True`` write a new one (mode 0600) if absent."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"key file not found: {path}")
        key = new_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
        return key
    key = as_key(path.read_text().strip())
    mode = path.stat().st_mode
    if os.name == "posix" and mode & 0o044 and str(path.resolve()) not in _WARNED_MODES:  # read bits
        _WARNED_MODES.add(str(path.resolve()))  # once per file and process
        log.warning("key file %s can be read by other users (mode %04o): whoever reads it can undo the hardened "
                    "veil's pad and link samples to file names; chmod 600 %s", path, mode & 0o777, path)
    return key


def key_fingerprint(key: bytes) -> str:
    """A short public fingerprint of a key (safe to log or write to a manifest)."""
    return hashlib.sha256(b"veil-fingerprint" + key).hexdigest()[:16]


def sample_digest(key: bytes, x_norm: torch.Tensor | np.ndarray) -> bytes:
    """HMAC of one normalized sample ``[C, H, W]`` (float32 contents and shape)."""
    torch = sys.modules.get("torch")  # not imported here: I/O processes hash without it (fast start)
    if torch is not None and isinstance(x_norm, torch.Tensor):
        x_norm = x_norm.detach().to("cpu", torch.float32).contiguous().numpy()
    a = np.ascontiguousarray(x_norm, dtype=np.float32)
    h = hmac.new(key, b"veil-sample", hashlib.sha256)
    h.update(np.asarray(a.shape, dtype=np.int64).tobytes())
    h.update(a.tobytes())
    return h.digest()


def opaque_key(key: bytes, name: str) -> str:
    """A dot-free, opaque identifier for a sample name (e.g. a file path).

    File names can be people's names, so shards carry this instead.
    """
    return hmac.new(key, b"veil-name" + name.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def keyed_uniform(key: bytes, digest: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniforms in [0, 1] of ``shape`` from a SHAKE-256 stream keyed by key and digest."""
    return _to_uniforms(_mask_stream(key, digest, int(np.prod(shape))), shape)


PAD_TAG = b"veil-hardened-pad-v1"


def pad_uniforms_np(bits: np.ndarray) -> np.ndarray:
    """The hardened mode's pad uniforms (float32, ``bits``' shape) from each sample's flip-mask bits
    (bool ``[B, ...]``, True = flipped where the pixel is not 0): ``u_i = SHAKE-256(tag || shape ||
    packbits(bits_i))`` read as little-endian uint32 / 2^32. No torch: ``veil-shard``'s I/O
    workers derive it ahead of the veil (see ``hardened.pad_uniforms``)."""
    shape = tuple(bits.shape[1:])
    n = int(np.prod(shape))
    head = PAD_TAG + np.asarray(shape, dtype=np.int64).tobytes()
    flat = np.asarray(bits, dtype=bool).reshape(len(bits), n)
    raw = b"".join(hashlib.shake_256(head + np.packbits(row).tobytes()).digest(4 * n) for row in flat)
    return _uniforms_np(raw, (len(bits), *shape))


def _mask_stream(key: bytes, digest: bytes, n: int) -> bytes:
    """The 4n bytes of one sample's mask: SHAKE-256 of the key and the sample's digest."""
    return hashlib.shake_256(b"veil-mask" + key + digest).digest(4 * n)


def _to_uniforms(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Little-endian uint32 stream -> float32 uniforms in [0, 1] of ``shape``: uint32 / 2^32 is below 1,
    but the top 128 values round to 1.0 in float32 (about one in 2^25; kept: the veils depend on it)."""
    import torch

    return torch.from_numpy(_uniforms_np(raw, shape))


def _uniforms_np(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    u = np.frombuffer(raw, dtype="<u4").astype(np.float64) / 2.0**32
    return u.astype(np.float32).reshape(shape)


def keyed_uniforms_np(key: bytes, x_norm: np.ndarray, digests: list[bytes] | None = None) -> np.ndarray:
    """:func:`keyed_uniforms_batch` for a float32 numpy batch (no torch needed).

    ``digests``: a list that receives each sample's :func:`sample_digest` (``veil-shard`` tags
    a shard's source content with them)."""
    shape = tuple(x_norm.shape[1:])
    n = int(np.prod(shape))
    ds = [sample_digest(key, a) for a in x_norm]
    if digests is not None:
        digests.extend(ds)
    return _uniforms_np(b"".join(_mask_stream(key, d, n) for d in ds), (len(x_norm), *shape))


def keyed_uniforms_batch(key: bytes, x_norm: torch.Tensor) -> torch.Tensor:
    """:func:`keyed_uniform` of :func:`sample_digest` for each sample of ``[B, ...]``, stacked."""
    import torch

    cpu = x_norm.detach().to("cpu", torch.float32).contiguous().numpy()
    return torch.from_numpy(keyed_uniforms_np(key, cpu))
