"""``VeiledDataset``: veil any dataset on the fly, in batches, each sample once.

Wraps a map-style or iterable dataset whose samples are an image, an
``(image, label, ...)`` tuple, a dict or any nesting of these. Every image in a
sample is veiled, found by :class:`VeilTransform`'s own rule (marked images,
``tv_tensors.Image`` or PIL, are all veiled; else the one plain tensor or array F
takes; several unmarked ones are refused, not one handed on unveiled), or the one
at ``image_key``. Images are veiled in batches of
``batch_size`` on the veil's device (one GPU batch rather than 300 passes per
sample in each worker) and cached, so every sample is veiled once:

- ``cache="memory"`` (default) keeps veiled images in RAM, per index, with a hash of the image they
  veil: a wrapped dataset that returns another image for an index (a random transform inside it) gets
  that image veiled anew, alone, never the old veil beside new targets (one warning, for either cache:
  put random augmentations after VeiledDataset); over an iterable dataset it keeps them per image content, so a
  stream whose images change between passes grows it by one veil per new image (one warning, from
  the second pass on);
- ``cache=<directory>`` stores each one as a ``.npy`` file named by an HMAC of
  its content under the veil's key, in a sub-folder per veil setting (settings,
  key fingerprint and a hash of F's weights as they are when each sample is looked up: a
  checkpoint loaded after the dataset was made gets its own), written
  atomically; a later run, another process or a DataLoader worker reuses it;
- ``cache=None`` veils every time (each access costs a full veil of that one sample).

The caches follow F's weights (a checkpoint loaded, an optimizer step, a layer replaced) in the main
process at every look-up, and in a DataLoader worker once, when it starts: a worker's F is a copy
made then, so with ``persistent_workers=True`` the workers keep the F they started with (make a new
DataLoader after changing F).

For DataLoaders with workers over a map-style dataset, call :meth:`prepare`
first: it veils everything in the main process with a progress bar, and the
workers then only read the cache (a worker that has to veil with the memory cache
warns once per worker process: its veils die with it, so each worker veils them again every epoch
unless ``persistent_workers=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import operator
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from . import functional as F
from . import keys as _keys
from .hardened import WeakPadError
from .transform import VeilTransform, from_chw, to_chw

log = logging.getLogger(__name__)
_BY_CONTENT = object()  # memory-cache id of an iterable dataset's images: their content hash


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
        self._memory: dict[Any, tuple[tuple, torch.Tensor]] | None = {} if cache == "memory" else None
        self._root: Path | None = None  # cache=<directory>; self._dir: its sub-folder for this veil
        self._dir: Path | None = None
        self._id: str | None = None  # what the caches hold veils of (_settings_id)
        self._id_of: tuple = (None, None)  # _settings_id's last (settings, key, F's fingerprint) and its id
        self._warned: set[str] = set()  # cache problems already reported (once each, not once per look-up)
        self._blocks: set[int] = set()  # map-style blocks veiled whole (a later miss in one: not deterministic)
        self._unusable: set[str] = set()  # digests of directory-cache files found unusable (a miss they explain)
        self._worker_checked = False  # in a DataLoader worker (a copy of this object): F checked there once
        if cache not in (None, "memory"):
            if not isinstance(cache, (str, os.PathLike)):
                raise TypeError(f"cache: expected 'memory', None or a directory path, got {cache!r}")
            self._root = Path(cache).expanduser()
        self._check_settings()

    def _check_settings(self, fast: bool = False) -> None:
        """Point the caches at this veil's settings, key and F's weights as they are now: F's weights
        loaded after the dataset was made (``F.load_state_dict(...)``) or changed in place must not get
        the veils of the F it was made with (the fingerprint is recomputed only when a weight changes).
        ``fast`` (a cache hit): F's weights are checked for in-place changes only (LocalModel.fingerprint)."""
        sid = self._settings_id(fast)
        if sid == self._id:
            return
        if self._id is not None:
            log.info("VeiledDataset: F's weights or the veil's settings changed; caching under %s", sid)
            if self._memory:
                self._memory.clear()
            self._blocks.clear()
        if self._root is not None:
            d = self._root / sid
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / "settings.json").write_text(json.dumps(self.veil.settings, indent=1, sort_keys=True))
            except OSError as e:
                if self._id is None:  # at construction: the cache cannot be used at all
                    raise ValueError(f"cache directory {self._root} cannot be used: {e.strerror or e}") from None
                # mid-run (F changed, the folder made read-only or full since): go on uncached, as a
                # failed write does (_from_dir and _to_dir take a missing folder)
                self._warn_unwritable(d, e)
            self._dir = d
        self._id = sid

    def __repr__(self) -> str:
        cache = "None" if self._memory is None and self._root is None else \
            "'memory'" if self._memory is not None else repr(str(self._root))
        try:
            n = f"{len(self.dataset)} samples"
        except TypeError:
            n = "iterable"
        key = "" if self.image_key is None else f", image_key={self.image_key!r}"
        return (f"{type(self).__name__}({type(self.dataset).__name__}, {n}, veil={self.veil!r}, "
                f"batch_size={self.batch_size}, cache={cache}{key})")

    def _settings_id(self, fast: bool = False) -> str:
        # settings, key and F's weights: a retrained F (same file name, same class) must not get the old veils
        what = (self.veil.settings, bytes(self.veil.key), self.veil.local_model.fingerprint(fast))  # (a copy)
        if what != self._id_of[0]:  # (json and sha256 once per change, not once per cache hit)
            s = json.dumps(what[0], sort_keys=True) + _keys.key_fingerprint(what[1]) + what[2]
            self._id_of = (what, "veil-" + hashlib.sha256(s.encode()).hexdigest()[:16])
        return self._id_of[1]

    # -- sample structure -------------------------------------------------------
    def _split(self, sample: Any) -> tuple[list[Any], Any]:
        """The images of ``sample`` to veil, and a function that puts veiled ones back in their places."""
        if self.image_key is not None:
            try:
                image = sample[self.image_key]
            except (KeyError, IndexError, TypeError):
                raise TypeError(f"image_key={self.image_key!r} is not in the sample "
                                f"({type(sample).__name__})") from None
            return [image], lambda veiled: _replace(sample, self.image_key, veiled[0])
        flat, spec = tree_flatten(sample)
        try:
            needs = self.veil.image_leaves(flat)
        except TypeError as e:
            raise TypeError(f"{e}; or pass VeiledDataset(image_key=...) to veil one of them and hand on the "
                            "rest as they are") from None
        where = [i for i, n in enumerate(needs) if n]

        def put(veiled: list[Any]) -> Any:
            out = list(flat)
            for i, v in zip(where, veiled):
                out[i] = v
            return tree_unflatten(out, spec)

        return [flat[i] for i in where], put

    # -- veiling with the cache ---------------------------------------------------
    def _veil_images(self, chws: list[torch.Tensor], ids: list[Any], *, cached_only: bool = False) -> list[Any]:
        """Veiled versions of ``chws``; ``ids`` are memory-cache ids (``(index, j)``, ``_BY_CONTENT`` or
        None). ``cached_only``: look up the caches only, None where a veil is not there."""
        # A worker's F is a copy made when the worker started (each epoch, unless persistent_workers), which
        # the main process's later changes never reach: checked once per worker process, not per hit
        if not (cached_only and self._worker_checked):
            self._check_settings(fast=cached_only)
            self._worker_checked = get_worker_info() is not None  # (a copy of this object, in the worker)
        out: list[torch.Tensor | None] = [None] * len(chws)
        todo: dict[tuple, list[int]] = defaultdict(list)
        digests: list[str | None] = [None] * len(chws)
        hashes: list[tuple | None] = [None] * len(chws)
        for i, (x, ident) in enumerate(zip(chws, ids)):
            F.check_pixels(x, "dataset image")
            if self._memory is not None and ident is not None:
                hashes[i] = _content_hash(x)
                if ident is _BY_CONTENT:
                    ids[i] = ident = hashes[i]
                held = self._memory.get(ident)
                if held is not None and held[0] == hashes[i]:
                    out[i] = held[1]
                    continue  # (another image than the one held: __getitem__ warns and veils it alone)
            if self._dir is not None:
                digests[i] = self._digest(x)
                out[i] = self._from_dir(digests[i], x)
                if out[i] is not None:
                    continue
            todo[(tuple(x.shape), x.dtype)].append(i)
        if cached_only:
            return out
        if len(todo) > 1:
            self._warn_once("shapes", "VeiledDataset: the images of one batch have %d different shapes or dtypes, "
                            "veiled as %d separate batches (%s); resize and convert them to one before "
                            "VeiledDataset to veil them %d at a time", len(todo), len(todo),
                            ", ".join(f"{'x'.join(map(str, s))} {str(dt).replace('torch.', '')}" for s, dt in list(todo)[:3])
                            + (", ..." if len(todo) > 3 else ""), self.batch_size)
        for (shape, _), idx in todo.items():
            self.veil.check_shape(shape)
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                try:
                    veiled = self.veil.veil_batch(torch.stack([chws[i] for i in part])).cpu()
                except WeakPadError as e:  # name the dataset's sample, not its place in this batch
                    ident = ids[part[e.sample]]
                    which = f"sample {ident[0]}" if isinstance(ident, tuple) and len(ident) == 2 and \
                        isinstance(ident[0], int) else "a sample of the stream"
                    raise WeakPadError(str(e).replace(f"sample {e.sample} ", f"{which} ", 1), e.sample) from None
                for i, v in zip(part, veiled):
                    out[i] = v
                    if self._dir is not None:
                        self._to_dir(digests[i], v)
        if self._memory is not None:
            for i, ident in enumerate(ids):
                if ident is not None:
                    self._memory[ident] = (hashes[i], out[i])
        return out

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
            self._unusable.add(digest)
            return None
        return torch.from_numpy(a)

    def _to_dir(self, digest: str, veiled: torch.Tensor) -> None:
        """Store one veil in the directory cache. A cache that can no longer be written (folder made
        read-only, disk full) is reported once and the run goes on uncached: the veils are still right."""
        f = self._dir / f"{digest}.npy"
        try:
            _atomic_save(f, veiled.numpy())
        except OSError as e:
            self._warn_unwritable(self._dir, e)
        else:
            self._warned.discard(str(f))

    def _warn_unwritable(self, where: Path, e: OSError) -> None:
        """Once: the directory cache cannot be written (read-only, disk full); the run goes on uncached."""
        self._warn_once("write", "cannot write the veil cache in %s (%s: %s): veiled samples are not being "
                        "cached, so each is veiled again next time", where, type(e).__name__, e.strerror or e)

    def _warn_once(self, what: str, msg: str, *args) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(msg, *args)

    def _veil_samples(self, samples: list[Any], indices: list[int] | None) -> list[Any]:
        """``samples`` with every image veiled; ``indices``: theirs in the dataset (None: an iterable's)."""
        split = [self._split(s) for s in samples]
        images = [im for ims, _ in split for im in ims]
        ids = [(k, j) if indices is not None else _BY_CONTENT
               for k, (ims, _) in zip(indices or [None] * len(samples), split) for j in range(len(ims))]
        veiled = iter(self._veil_images([to_chw(im) for im in images], ids))
        # copies: an in-place change downstream (an augmentation) must not reach the memory cache
        return [put([from_chw(next(veiled).clone(), im) for im in ims]) for ims, put in split]

    # -- map-style -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"index must be an integer, got {type(index).__name__} (slices are not supported)")
        try:
            index = operator.index(index)  # ints, numpy integers, 0-d integer tensors (a Sampler's)
        except TypeError:
            raise TypeError(f"index must be an integer, got {index!r}") from None
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        sample = self.dataset[index]
        if self._memory is None and self._dir is None:  # no cache: a block's other veils would be thrown away
            return self._veil_samples([sample], [index])[0]
        images, put = self._split(sample)  # this sample's own veils: a DataLoader worker after prepare() reads just those
        held = self._veil_images([to_chw(im) for im in images], [(index, j) for j in range(len(images))],
                                 cached_only=True)
        if all(v is not None for v in held):
            return put([from_chw(v.clone(), im) for v, im in zip(held, images)])
        if self._memory is not None and get_worker_info() is not None:
            self._warn_once("worker", "VeiledDataset(cache='memory') is veiling in a DataLoader worker, which "
                            "keeps its veils to itself and loses them when it exits (every epoch, unless "
                            "persistent_workers): call prepare() before making the DataLoader, or use "
                            "cache=<directory>")
        start = index // self.batch_size * self.batch_size
        if start in self._blocks:  # veiled whole before, yet a miss: the wrapped dataset is not deterministic
            # (or the directory cache could not keep the block, or its file was damaged: said already)
            if "write" not in self._warned and not (
                    self._unusable and self._dir is not None
                    and any(self._digest(to_chw(im)) in self._unusable for im in images)):
                self._warn_once("random", "the wrapped dataset returned another image for sample %s than when it "
                                "was veiled (a random transform inside it?): every such access is veiled again, "
                                "a full veil of that sample alone (not of its batch of %d)%s; apply random "
                                "augmentations to VeiledDataset's output instead", index, self.batch_size,
                                f", and stored in {self._dir}, which grows each epoch" if self._dir is not None else "")
            return self._veil_samples([sample], [index])[0]
        # veil the whole block this index falls in: one batch instead of one sample
        block = list(range(start, min(start + self.batch_size, n)))
        samples = [sample if i == index else self.dataset[i] for i in block]
        out = self._veil_samples(samples, block)[index - start]
        self._blocks.add(start)  # only once veiled: a read error or Ctrl-C half-way is not "not deterministic"
        return out

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
                self._veil_samples([self.dataset[i] for i in block], block)  # cached samples are not veiled again
                self._blocks.add(start)
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

    _passes = 0  # full passes over the stream this object (not a worker's copy) has made

    def __iter__(self):
        if self._memory is not None and get_worker_info() is not None:
            self._warn_once("worker", "VeiledDataset(cache='memory') over an IterableDataset is veiling in a "
                            "DataLoader worker, which keeps its veils to itself and loses them when it exits: "
                            "every epoch veils the stream again unless persistent_workers; use "
                            "cache=<directory> to keep them")
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
        if count == 0 and get_worker_info() is None:  # a worker's share may be empty
            raise ValueError("dataset is empty: nothing to veil")
        self._passes += 1

    def _flush(self, buf: list[Any]) -> Iterable[Any]:
        held = None if self._memory is None else len(self._memory)
        out = self._veil_samples(buf, None)  # memory cache by content: the order may change between epochs
        if held is not None and self._passes and len(self._memory) > held:
            self._warn_once("grows", "the stream yielded images it did not yield in an earlier pass (a random "
                            "transform upstream?): each new image is veiled anew, a full veil each, and "
                            "cache='memory' keeps every one (now %d veils, without bound); apply random "
                            "augmentations to VeiledDataset's output instead, or pass cache=None",
                            len(self._memory))
        return out


def _content_hash(x: torch.Tensor) -> tuple:
    """What the memory cache checks an image against (in-process only, so unkeyed)."""
    x = x.detach().cpu().contiguous()
    return tuple(x.shape), str(x.dtype), hashlib.blake2b(x.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


def _replace(sample: Any, slot: Any, veiled: Any) -> Any:
    """``sample`` with ``sample[slot]`` replaced (dicts, lists, tuples and namedtuples)."""
    if isinstance(sample, dict):
        return {**sample, slot: veiled}
    out = list(sample)
    out[slot] = veiled
    if isinstance(sample, list):
        return out
    return tuple(out) if type(sample) is tuple else type(sample)(*out)  # namedtuples too


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
