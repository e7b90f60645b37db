"""``VeiledDataset``: veil any dataset on the fly, in batches, each sample once.

Wraps a map-style or iterable dataset whose samples are an image, an
``(image, label, ...)`` tuple or a dict. Images are veiled in batches of
``batch_size`` on the veil's device (one GPU batch rather than 300 passes per
sample in each worker) and cached, so every sample is veiled once:

- ``cache="memory"`` (default) keeps veiled images in RAM;
- ``cache=<directory>`` stores each one as a ``.npy`` file named by an HMAC of
  its content under the veil's key, in a sub-folder per veil setting (settings,
  key fingerprint and a hash of F's weights), written
  atomically; a later run, another process or a DataLoader worker reuses it;
- ``cache=None`` veils every time (each access costs a full veil of that one sample).

For DataLoaders with workers over a map-style dataset, call :meth:`prepare`
first: it veils everything in the main process with a progress bar, and the
workers then only read the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from . import functional as F
from . import keys as _keys
from .transform import VeilTransform, from_chw, to_chw

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "img", "png", "jpg", "jpeg", "x", "input")


class VeiledDataset(Dataset):
    """See the module docstring. ``VeiledDataset(iterable_ds, ...)`` returns a ``VeiledIterableDataset``."""

    def __new__(cls, *args, **kwargs):
        dataset = args[0] if args else kwargs.get("dataset")
        if cls is VeiledDataset and isinstance(dataset, IterableDataset):
            cls = VeiledIterableDataset
        return super().__new__(cls)

    def __init__(
        self,
        dataset,
        veil: VeilTransform,
        *,
        batch_size: int = 256,
        cache: str | os.PathLike | None = "memory",
        image_key: Any = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(veil, VeilTransform):
            raise TypeError(f"veil: expected a VeilTransform, got {type(veil).__name__}")
        if not F.is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        batch_size = int(batch_size)
        if not isinstance(self, IterableDataset):
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
                raise TypeError("dataset: expected a map-style (len + getitem) or an IterableDataset")
            if len(dataset) == 0:
                raise ValueError("dataset is empty: nothing to veil")
        self.dataset, self.veil, self.batch_size = dataset, veil, batch_size
        self.image_key, self.progress = image_key, progress
        self._memory: dict[Any, torch.Tensor] | None = {} if cache == "memory" else None
        self._dir: Path | None = None
        self._warned: set[str] = set()  # cache problems already reported (once each, not once per look-up)
        if cache not in (None, "memory"):
            if not isinstance(cache, (str, os.PathLike)):
                raise TypeError(f"cache: expected 'memory', None or a directory path, got {cache!r}")
            self._dir = Path(cache) / self._settings_id()
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                (self._dir / "settings.json").write_text(json.dumps(veil.settings, indent=1, sort_keys=True))
            except OSError as e:
                raise ValueError(f"cache directory {cache} cannot be used: {e.strerror or e}") from None

    def _settings_id(self) -> str:
        # settings, key and F's weights: a retrained F (same file name, same class) must not get the old veils
        s = json.dumps(self.veil.settings, sort_keys=True) + _keys.key_fingerprint(self.veil.key) \
            + self.veil.local_model.fingerprint()
        return "veil-" + hashlib.sha256(s.encode()).hexdigest()[:16]

    # -- sample structure -------------------------------------------------------
    def _image_slot(self, sample: Any) -> Any:
        if self.image_key is not None:
            return self.image_key
        if isinstance(sample, (tuple, list)):
            return 0
        if isinstance(sample, dict):
            for k in IMAGE_KEYS:
                if k in sample:
                    return k
            raise TypeError(f"cannot find the image in a dict sample with keys {list(sample)}; pass image_key=")
        return None  # the sample is the image

    def _get_image(self, sample):
        slot = self._image_slot(sample)
        return sample if slot is None else sample[slot]

    def _put_image(self, sample, veiled):
        slot = self._image_slot(sample)
        if slot is None:
            return veiled
        if isinstance(sample, dict):
            return {**sample, slot: veiled}
        out = list(sample)
        out[slot] = veiled
        if isinstance(sample, list):
            return out
        return tuple(out) if type(sample) is tuple else type(sample)(*out)  # namedtuples too

    # -- veiling with the cache ---------------------------------------------------
    def _veil_images(self, chws: list[torch.Tensor], ids: list[Any]) -> list[torch.Tensor]:
        """Veiled versions of ``chws``; ``ids`` are memory-cache ids (index or None)."""
        out: list[torch.Tensor | None] = [None] * len(chws)
        todo: dict[tuple, list[int]] = defaultdict(list)
        digests: list[str | None] = [None] * len(chws)
        for i, (x, ident) in enumerate(zip(chws, ids)):
            F.check_pixels(x, "dataset image")
            if self._memory is not None and ident is not None and ident in self._memory:
                out[i] = self._memory[ident]
                continue
            if self._dir is not None:
                digests[i] = self._digest(x)
                out[i] = self._from_dir(digests[i], x)
                if out[i] is not None:
                    continue
            todo[(tuple(x.shape), x.dtype)].append(i)
        for (shape, _), idx in todo.items():
            self.veil.check_shape(shape)
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                veiled = self.veil.veil_batch(torch.stack([chws[i] for i in part])).cpu()
                for i, v in zip(part, veiled):
                    out[i] = v
                    if self._dir is not None:
                        self._to_dir(digests[i], v)
        if self._memory is not None:
            for i, ident in enumerate(ids):
                if ident is not None:
                    self._memory[ident] = out[i]
        return out  # type: ignore[return-value]

    def _digest(self, x: torch.Tensor) -> str:
        return _keys.sample_digest(self.veil.key, F.normalize(x)).hex()

    def _from_dir(self, digest: str, x: torch.Tensor) -> torch.Tensor | None:
        """The directory cache's veil of ``x``, or None if absent or unusable (then it is veiled anew
        and the file rewritten: a torn or foreign file must not come back as a veiled image)."""
        f = self._dir / f"{digest}.npy"
        if not f.exists():
            return None
        try:
            a = np.load(f, allow_pickle=False)
            if a.shape != tuple(x.shape) or a.dtype != torch.empty(0, dtype=x.dtype).numpy().dtype:
                raise ValueError(f"holds {a.dtype} {a.shape}, expected {x.dtype} {tuple(x.shape)}")
        except (OSError, ValueError, EOFError) as e:
            self._warn_once(str(f), "cache file %s is unusable (%s): veiling that sample again", f, e)
            return None
        return torch.from_numpy(a)

    def _to_dir(self, digest: str, veiled: torch.Tensor) -> None:
        """Store one veil in the directory cache. A cache that can no longer be written (folder made
        read-only, disk full) is reported once and the run goes on uncached: the veils are still right."""
        f = self._dir / f"{digest}.npy"
        try:
            _atomic_save(f, veiled.numpy())
        except OSError as e:
            self._warn_once("write", "cannot write the veil cache in %s (%s: %s): veiled samples are not being "
                            "cached, so each is veiled again next time", self._dir, type(e).__name__,
                            e.strerror or e)
        else:
            self._warned.discard(str(f))

    def _warn_once(self, what: str, msg: str, *args) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(msg, *args)

    def _veil_samples(self, samples: list[Any], ids: list[Any]) -> list[Any]:
        images = [self._get_image(s) for s in samples]
        veiled = self._veil_images([to_chw(im) for im in images], ids)
        # copies: an in-place change downstream (an augmentation) must not reach the memory cache
        return [self._put_image(s, from_chw(v.clone(), im)) for s, v, im in zip(samples, veiled, images)]

    # -- map-style -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an integer, got {type(index).__name__} (slices are not supported)")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index = int(index) % n
        sample = self.dataset[index]
        if self._memory is not None and index in self._memory:
            im = self._get_image(sample)
            return self._put_image(sample, from_chw(self._memory[index].clone(), im))
        if self._dir is not None:  # this sample's own file: a DataLoader worker after prepare() reads just that
            im = self._get_image(sample)
            x = to_chw(im)
            F.check_pixels(x, "dataset image")
            hit = self._from_dir(self._digest(x), x)
            if hit is not None:
                return self._put_image(sample, from_chw(hit, im))
        if self._memory is None and self._dir is None:  # no cache: a block's other veils would be thrown away
            return self._veil_samples([sample], [None])[0]
        # veil the whole block this index falls in: one batch instead of one sample
        start = index // self.batch_size * self.batch_size
        block = range(start, min(start + self.batch_size, n))
        samples = [sample if i == index else self.dataset[i] for i in block]
        return self._veil_samples(samples, list(block))[index - start]

    def prepare(self) -> "VeiledDataset":
        """Veil every sample now (in batches, with a progress bar); returns self."""
        from .progress import bar

        if self._memory is None and self._dir is None:
            raise ValueError("prepare() with cache=None would veil every sample and keep none: use "
                             "cache='memory' or a directory, or leave prepare() out (each access veils anew)")

        n = len(self)
        with bar(total=n, desc="veiling", unit="img", disable=not self.progress) as pb:
            for start in range(0, n, self.batch_size):
                block = list(range(start, min(start + self.batch_size, n)))
                if self._memory is None or any(i not in self._memory for i in block):
                    self._veil_samples([self.dataset[i] for i in block], block)
                pb.update(len(block))
        return self


class VeiledIterableDataset(VeiledDataset, IterableDataset):
    """Iterable flavour: buffers ``batch_size`` samples, veils them as a batch, yields them in order."""

    def __len__(self) -> int:
        return len(self.dataset)  # raises TypeError if the wrapped dataset has no length

    def __getitem__(self, index):
        raise TypeError("a VeiledDataset over an IterableDataset has no indexing: iterate over it")

    def prepare(self):
        raise TypeError("prepare() needs a map-style dataset; an iterable one is veiled as it is iterated "
                        "(with cache='memory' or a directory, each sample only the first time)")

    def __iter__(self):
        buf: list[Any] = []
        count = 0
        for sample in self.dataset:
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield from self._flush(buf)
                count += len(buf)
                buf = []
        if buf:
            yield from self._flush(buf)
            count += len(buf)
        if count == 0 and torch.utils.data.get_worker_info() is None:  # a worker's share may be empty
            raise ValueError("dataset is empty: nothing to veil")

    def _flush(self, buf: list[Any]) -> Iterable[Any]:
        ids = []
        for s in buf:  # memory cache by content digest: order may change between epochs
            x = to_chw(self._get_image(s))
            ids.append(_keys.sample_digest(self.veil.key, F.normalize(x)) if self._memory is not None else None)
        return self._veil_samples(buf, ids)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
