"""Veiled WebDataset shards: write them (resumable, multi-process) and read them back.

Writing (:func:`write_shards`, the engine behind ``veil-shard``):

- the source (an ImageFolder tree, a flat folder with a labels CSV, or
  WebDataset tar shards) is listed, then put in a keyed order (sorted by an
  HMAC of each relative path under the key, :func:`keyed_order`; the order of
  file names would tell a third party each sample's alphabetical rank and keep
  runs such as ``Name_0001.jpg, Name_0002.jpg`` together); shard ``i`` holds
  samples ``[i * shard_size, (i + 1) * shard_size)`` of that list, so shard
  contents never depend on timing, resumes or the number of processes (an OUT
  started before the keyed order, manifest format ``veil-shards/1``, keeps the
  sorted one; an earlier veil-shard refuses to resume a ``veil-shards/2`` OUT);
- each sample is ``{"__key__": opaque key, "png": veiled PNG, "cls": label}``;
  the opaque key is ``keys.opaque_key(key, relative path)``, so file names
  (which can be people's names) never reach the shards;
- a shard is written to ``.veil-NNNNNN.tar.tmp``, flushed, fsynced, renamed
  and then recorded in ``manifest.json`` (rewritten atomically, under a file
  lock, so several processes can share one OUT; when rewriting it grows
  costly next to the pace of shards, records are spaced and carry several
  shards, see ``MANIFEST_SPACING``); a rerun skips recorded shards (whose
  files still match their sha256) and redoes the rest, so ``kill -9`` at any moment loses nothing and duplicates
  nothing. A rerun with other veil parameters, another key or another source
  listing is refused;
- images are decoded (and their keyed masks derived) by a thread pool ahead
  of the veil loop, and PNG encoding + tar writing happen in a writer thread,
  so the veil loop does not wait on I/O; with ``io_procs`` the decoding and
  the encoding run in spawned processes instead (one Python process's GIL
  caps the threads at ~2.5-4.5k small images/s, depending on the CPU, below a GPU's veil rate). Veil
  batches run across shard boundaries;
- with ``rank``/``world_size`` several processes split the shards
  (shard ``i`` -> rank ``i % world_size``); the output is identical to a
  one-process run;
- each shard's manifest entry records a ``source_tag``: a keyed HMAC of its samples' content
  (:func:`source_tag`), which ``veil-export`` checks against ``--originals``;
- with ``copies`` K > 1 every image is veiled K times, copy ``c`` under its own key
  ``hardened.copy_keys(key, K)[c]`` (mask, pad and opaque key), as ``VeilTransform(F,
  key=copy_keys(key, K)[c])`` would; the listing is taken K times over, copy by copy, so
  shard ``i`` still holds a fixed slice of it (the hardened recipe: 4 veils of 75 steps);
- corrupt or unreadable images are skipped and listed in the manifest (a folder that
  cannot be listed is an error: its images would vanish unreported).
  Every image is converted to the most common channel count among the sampled images
  (grey ``L`` -> 1 channel, anything else -> RGB); images whose height or width
  differ from the most common size among ``SHAPE_SAMPLE`` images spread over the
  listing are skipped as ``size mismatch`` (listed like corrupt ones; ``veil-shard``
  fails when that is more than half of them).

The manifest stays with the data owner (it lists skipped files by relative
path); ``veil-export`` produces what a third party gets.

Reading: :func:`load` returns a ``webdataset.WebDataset`` pipeline yielding
``(uint8 tensor [C, H, W], int label)``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import hmac
import io
import json
import logging
import operator
import os
import queue
import re
import struct
import tarfile
import threading
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from . import keys as _keys

log = logging.getLogger(__name__)

FORMAT = "veil-shards/2"  # /2: the listing in a keyed order (an earlier veil-shard refuses to resume it)
FORMAT_SORTED = "veil-shards/1"  # the listing in sorted order: resumed as it was started
SHARD_NAME = "veil-{:06d}.tar"
MANIFEST = "manifest.json"
RECEIPT = "receipt.json"
LOCK = ".manifest.lock"
RUN_LOCK = ".veil-shard.lock"  # held by a run's processes while they work on OUT
IMAGE_EXTS = {"png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm", "pnm"}
LABEL_EXTS = ("cls", "class", "label", "cls.txt", "label.txt")
TAR_MTIME = 0  # fixed tar metadata: identical inputs give byte-identical shards
# test hook: seconds to sleep per written sample (widens the windows a kill can hit)
_THROTTLE_ENV = "_VEIL_SHARDS_TEST_THROTTLE"


class ShardError(Exception):
    """Bad input or state (missing model, empty source, mismatch on resume, ...): one line, no traceback."""


class VerifyError(Exception):
    """Shards do not match their manifest."""


def library_version() -> str:
    from . import __version__

    return __version__


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


def default_key_file(out: str | os.PathLike) -> Path:
    """``<parent>/<OUT name>.key``: beside OUT, never inside it."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}.key"


def is_inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """True if ``path`` is ``directory`` or below it (after resolving links)."""
    p, d = Path(path).resolve(), Path(directory).resolve()
    return p == d or d in p.parents


# -- the source ------------------------------------------------------------------
@dataclass(frozen=True)
class SourceItem:
    rel: str  # relative path: the sort key and the opaque-key input
    label: int
    path: str  # the file, or the tar file holding it
    offset: int = -1  # tar members: data offset and size
    size: int = -1


@dataclass
class Source:
    kind: str  # "imagefolder", "labels-csv" or "webdataset"
    root: str
    items: list[SourceItem]
    classes: list[str] | None = None
    labels_file: str | None = None
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # what the listing leaves out or numbers oddly (warned)

    def listing_sha256(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.rel}\t{it.label}\n".encode("utf-8"))
        return h.hexdigest()

    def read_bytes(self, item: SourceItem) -> bytes:
        return read_item(item)


def read_item(item: SourceItem) -> bytes:
    """An item's file bytes (a whole file, or a member of a tar file)."""
    with open(item.path, "rb") as f:
        if item.offset < 0:
            return f.read()
        f.seek(item.offset)
        data = f.read(item.size)
    if len(data) != item.size:
        raise OSError(f"tar member truncated ({len(data)} of {item.size} bytes)")
    return data


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode's surrogate escapes of bytes that are not UTF-8
        return False
    return True


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def open_source(src: str | os.PathLike, labels: str | os.PathLike | None = None) -> Source:
    """List a source: an ImageFolder tree, a flat folder + labels CSV, or WebDataset shards.

    Raises :class:`ShardError` when ``src`` does not exist or holds no images.
    """
    try:
        source = _open_source(str(src), labels)
    except OSError as e:
        raise ShardError(f"cannot read the source {e.filename or src}: {e.strerror or e}") from None
    if not source.items:
        raise ShardError(f"no images found in {src}")
    source.items.sort(key=lambda it: it.rel)
    rels = [it.rel for it in source.items]
    bad = [r for r in rels if not _is_utf8(r)]
    if bad:  # the manifest, the listing's hash and the private map hold names as UTF-8
        raise ShardError(f"{len(bad)} file name(s) in {src} are not valid UTF-8, e.g. {bad[0]!r} "
                         "(\\udcXX: the undecodable bytes); rename them")
    if len(set(rels)) != len(rels):
        twice = next(a for a, b in zip(rels, rels[1:]) if a == b)  # sorted: a repeat is next to itself
        raise ShardError(f"source {src} lists the same sample twice: {twice} (a labels file naming it on two rows?)")
    return source


def _open_source(s: str, labels) -> Source:
    p = Path(s)
    if labels is not None:
        if not p.is_dir():
            raise ShardError(f"source folder not found: {s}")
        source = _labels_csv_source(p, Path(labels))
    elif p.is_dir() and any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir()):
        source = _imagefolder_source(p)
    elif p.is_dir() and any(c.suffix == ".tar" for c in p.iterdir()):
        source = _webdataset_source(sorted(str(c) for c in p.iterdir() if c.suffix == ".tar"), p)
    elif p.is_file() and p.suffix == ".tar":
        source = _webdataset_source([s], p.parent)
    elif "{" in s and not p.exists():
        import braceexpand

        tars = [t for t in braceexpand.braceexpand(s)]
        missing = [t for t in tars if not Path(t).is_file()]
        if missing:
            raise ShardError(f"source shard not found: {missing[0]}")
        source = _webdataset_source(tars, None)
    elif p.is_dir():
        raise ShardError(
            f"no images found in {s}: expected class sub-folders (ImageFolder), "
            "a flat folder with --labels, or .tar shards"
        )
    else:
        raise ShardError(f"source not found: {s}")
    return source


def _imagefolder_source(root: Path) -> Source:
    classes = sorted(c.name for c in root.iterdir() if c.is_dir() and not c.name.startswith("."))
    loose = sorted(c.name for c in root.iterdir() if c.is_file() and not c.name.startswith(".")
                   and _ext(c.name) in IMAGE_EXTS)
    if loose:  # an ImageFolder reads only class folders: these would vanish without a word
        raise ShardError(
            f"{root} holds {len(loose)} image(s) at its top level (e.g. {loose[0]}) beside class folders "
            f"({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}), and an ImageFolder reads only the class "
            "folders: move the images into a class folder, or move the folders out and give --labels")
    items = []
    # Folder links: one into SRC itself (a loop, an alias of a class, a link into another class, which
    # would give its images this class's label) is not followed, as its folder is listed in its own
    # place; nor one to SRC's own folder or a folder above it (a "data root" shortcut), through which every
    # other class would be listed under this class's label, and files beside SRC too; one out of SRC
    # (data on another disk) is followed, each real folder once (loops end).
    root_real = os.path.realpath(root)
    # folders are told apart by device and inode, as well as by real path: a bind mount (of SRC's folder,
    # one above it, a class folder or an outside folder linked twice) has another path, the same identity
    seen: dict = {}  # identity (or real path) -> the path it was listed under

    def ident(path) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    above_ids, f = set(), root_real  # SRC's folder and those above it
    while True:
        above_ids.add(ident(f))
        if os.path.dirname(f) == f:
            break
        f = os.path.dirname(f)
    above_ids.discard(None)
    class_ids = {ident(root / c): str(root / c) for c in classes if not (root / c).is_symlink()}
    class_ids.pop(None, None)

    def unreadable(e: OSError):  # os.walk leaves out what it cannot list: its images would vanish unreported
        raise ShardError(f"cannot list folder {e.filename} ({e.strerror or e}): its images would be left out; "
                         "make it readable, or move it out of the source")

    for ci, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / c, onerror=unreadable, followlinks=True):
            real, me = os.path.realpath(dirpath), ident(dirpath)
            above = me in above_ids
            inside = (os.path.islink(dirpath) and real.startswith(root_real + os.sep)) or \
                class_ids.get(me, dirpath) != dirpath  # (another class's folder, bind-mounted here)
            was = seen.get(me or real)
            if above or inside or was:
                log.warning("folder %s is a link to %s, %s: not listed through the link", dirpath, real,
                            "which holds the source itself" if above else
                            "inside the source, listed in its own place" if inside else f"already listed as {was}")
                dirnames[:] = []
                continue
            seen[me or real] = dirpath
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # which link is first: fixed
            # paths joined as strings, once per folder: pathlib per file was most of the listing's
            # time (1.3 s for 32k files on a 2-core CPU); same strings (dirpath comes from a Path)
            rel = Path(dirpath).relative_to(root).as_posix() + "/"
            for fn in filenames:
                if fn.startswith(".") or _ext(fn) not in IMAGE_EXTS:
                    continue
                items.append(SourceItem(rel + fn, ci, os.path.join(dirpath, fn)))
    empty = sorted(set(range(len(classes))) - {it.label for it in items})
    if empty:  # said, not refused: a validation split may lack a class and must keep the train split's indices
        names = ", ".join(repr(classes[i]) + (" (a link, not followed: see the warning above)"
                                              if (root / classes[i]).is_symlink() else "")
                          for i in empty[:3]) + (", ..." if len(empty) > 3 else "")
        notice = (f"{len(empty)} class folder(s) of {root} hold no images ({names}): each keeps its label index, "
                  "as ImageFolder(allow_empty=True) numbers them (torchvision's default refuses such a folder); "
                  "removing one would renumber every later class")
        log.warning("%s", notice)
    return Source("imagefolder", str(root.resolve()), items, classes=classes, notices=[notice] if empty else [])


def _is_int_text(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def _labels_csv_source(root: Path, labels: Path) -> Source:
    if not labels.is_file():
        raise ShardError(f"labels file not found: {labels}")
    try:
        with open(labels, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            rows, lines = [], []  # and each row's line in the file (for messages)
            for r in reader:
                rows.append(r)
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ShardError(f"cannot read labels file {labels}: {e}") from None
    if not rows or not {"filename", "label"} <= set(rows[0]):
        raise ShardError(f"labels file {labels} must have a header with columns filename,label")
    raw = [(r["filename"].strip(), (r["label"] or "").strip()) for r in rows]
    blank = next((i for i, (_, v) in enumerate(raw) if not v), None)
    if blank is not None:
        raise ShardError(f"labels file {labels} line {lines[blank]} ({raw[blank][0]}): the label is empty")
    classes = None
    numeric = [_is_int_text(v) for _, v in raw]
    if any(numeric) and not all(numeric):  # sorted as names, "10" < "2": every index would change silently
        odd = numeric.index(False) if numeric.count(True) >= len(numeric) / 2 else numeric.index(True)
        raise ShardError(f"labels file {labels} line {lines[odd]} ({raw[odd][0]}): label {raw[odd][1]!r} mixes "
                         "class indices and class names in one file; use one or the other")
    try:
        lab = [int(v) for _, v in raw]
    except ValueError:
        classes = sorted({v for _, v in raw})
        index = {c: i for i, c in enumerate(classes)}
        lab = [index[v] for _, v in raw]
    else:
        bad = next((i for i, y in enumerate(lab) if y < 0), None)
        if bad is not None:
            raise ShardError(f"labels file {labels} line {lines[bad]} ({raw[bad][0]}): label {lab[bad]} is negative; "
                             "class indices start at 0")
    items = []
    # one realpath per row, joined and compared as strings: Path.resolve three times a row (the row's
    # file, and is_inside's two) was 260-780 us a row, minutes of silence before a run of 1M rows
    root_r = os.path.realpath(root)
    prefix = root_r.rstrip(os.sep) + os.sep
    for (fn, _), y in zip(raw, lab):
        full = os.path.realpath(os.path.join(root_r, fn))
        if full == root_r:
            rel = "."
        elif full.startswith(prefix):
            rel = Path(full[len(prefix):]).as_posix() if os.sep != "/" else full[len(prefix):]
        else:
            raise ShardError(f"labels file {labels} names a file outside {root}: {fn}")
        items.append(SourceItem(rel, y, full))
    notice = _warn_unlisted(root_r, {it.rel for it in items} | {Path(os.path.normpath(fn)).as_posix() for fn, _ in raw},
                            labels)
    return Source("labels-csv", root_r, items, classes=classes, labels_file=str(labels.resolve()),
                  notices=[notice] if notice else [])


def _warn_unlisted(root: str, listed: set[str], labels: Path) -> str | None:
    """Warn about images in a --labels folder that the labels file does not name: they are not veiled,
    and saying nothing would make that a silent loss (the labels file may be meant as a selection)."""
    unlisted, example = 0, None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for fn in sorted(filenames):
            if fn.startswith(".") or _ext(fn) not in IMAGE_EXTS:
                continue
            r = fn if rel == "." else f"{rel}/{fn}"
            if r not in listed:
                unlisted += 1
                example = example or r
    if not unlisted:
        return None
    notice = f"{unlisted} image file(s) in {root} are not in the labels file {labels.name} (e.g. {example}): not veiled"
    log.warning("%s", notice)
    return notice


_TAR_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key up to the first dot of the basename


def _webdataset_source(tars: list[str], root: Path | None) -> Source:
    items, errors = [], []
    for t in tars:
        name = Path(t).name if root is None else Path(t).resolve().relative_to(root.resolve()).as_posix()
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        label_data: dict[str, bytes] = {}
        try:
            with tarfile.open(t, "r:") as tf:
                for m in tf:
                    mt = _TAR_KEY.match(m.name)
                    if not (m.isfile() and mt):
                        continue
                    k, e = mt.group(1), mt.group(2).lower()
                    groups.setdefault(k, {})[e] = m
                    if e in LABEL_EXTS and k not in label_data:
                        label_data[k] = tf.extractfile(m).read()
                end = tf.offset  # where tarfile stopped: the end-of-archive marker, if any
            if not _has_end_marker(t, end):
                # tarfile stops silently at the end of the file (or at a damaged header): a tar cut at a
                # member boundary looks complete, minus the samples after the cut
                errors.append(f"{name}: no end-of-archive marker after {len(groups)} samples (truncated?)")
                log.warning("source shard %s has no end-of-archive marker: it may be truncated, and the samples "
                            "after the cut are missing (%d read)", name, len(groups))
        except (tarfile.TarError, OSError, EOFError) as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
            log.warning("source shard %s is damaged (%s); using the samples before the damage", name, e)
        for k, g in groups.items():
            img = next((g[e] for e in sorted(g) if e in IMAGE_EXTS), None)
            if img is None:
                continue
            try:
                y = int(label_data[k].decode().strip()) if k in label_data else -1
            except ValueError:
                y = -1  # skipped as "no label" when decoded
            items.append(SourceItem(f"{name}/{k}", y, str(t), img.offset_data, img.size))
    return Source("webdataset", str(root.resolve()) if root else "", items, errors=errors)


def _has_end_marker(path: str, offset: int) -> bool:
    """True if a zero block (the end-of-archive marker) follows the last member, at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(_TAR_BLOCK)
    return len(block) == _TAR_BLOCK and not any(block)


# -- images ------------------------------------------------------------------------
def decode_image(data: bytes, channels: int | None = None) -> np.ndarray:
    """PNG/JPEG/... bytes -> uint8 ``[C, H, W]`` (grey -> 1 channel, else RGB; or forced ``channels``)."""
    import PIL.Image
    import PIL.ImageOps

    with PIL.Image.open(io.BytesIO(data)) as im:
        im.load()
        im = PIL.ImageOps.exif_transpose(im)
        deep = im.mode in ("I", "F") or im.mode.startswith("I;16")  # 16-bit (any byte order), 32-bit, float grey
        if channels is None:
            channels = 1 if deep or im.mode in ("1", "L", "LA") else 3
        if channels not in (1, 3):
            raise ValueError(f"unsupported channel count {channels}")
        if deep:  # scaled to 8 bits here: PIL's convert() clips them (to 0 / 255) or misreads big-endian
            a = np.asarray(im, dtype=np.float64)
            a = a / 257.0 if im.mode.startswith("I;16") or a.max() > 255 else a
            grey = np.clip(np.round(a), 0, 255).astype(np.uint8)[None]
            return grey if channels == 1 else np.repeat(grey, 3, axis=0)
        want = "L" if channels == 1 else "RGB"
        if im.mode != want:
            im = im.convert(want)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None].copy() if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


# zlib level of the PNGs we write: veiled pixels are close to noise, so level 1 is 2x faster
# than 6 for ~7% more bytes (MNIST-sized veils: 24 vs 48 us, 423 vs 394 bytes)
PNG_LEVEL = 1


def encode_png(chw: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3) -> lossless 8-bit grey/RGB PNG bytes with no metadata chunks.

    Written directly (signature, IHDR, one IDAT, IEND; filter "none" on every
    row) rather than through PIL: 4x faster for small images, and nothing but
    the pixels can end up in the file.
    """
    a = np.asarray(chw)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(f"encode_png: expected uint8 [1|3, H, W], got {a.dtype} {a.shape}")
    c, h, w = a.shape
    raw = np.zeros((h, 1 + w * c), np.uint8)  # a 0 (no filter) byte before each row
    raw[:, 1:] = a[0] if c == 1 else a.transpose(1, 2, 0).reshape(h, w * 3)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _png_chunk(b"IEND", b"")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


_TAR_BLOCK, _TAR_RECORD = 512, 10240


def tar_member(name: str, data: bytes, mtime: int = 0, owner: str = "veil") -> bytes:
    """One regular-file member (header + data + padding), byte-identical to what ``tarfile``
    (and so webdataset's TarWriter) writes for ``TarInfo(name)`` with ``size``, ``mtime``,
    mode 0444 and ``owner`` as user and group; about 10x faster. Names must be ASCII, < 100 bytes.
    """
    nb, ob = name.encode("ascii"), owner.encode("ascii")
    if len(nb) >= 100 or len(ob) >= 32:
        raise ValueError(f"tar member name or owner too long: {name!r}")
    head = b"".join((
        nb.ljust(100, b"\0"), b"0000444\0", b"0000000\0", b"0000000\0",
        b"%011o\0" % len(data), b"%011o\0" % mtime, b"        ", b"0", b"\0" * 100, b"ustar\x0000",
        ob.ljust(32, b"\0"), ob.ljust(32, b"\0"), b"\0" * 183,  # no device numbers, no prefix, padding
    ))
    head = head[:148] + b"%06o\0 " % sum(head) + head[156:]
    return head + data + b"\0" * (-len(data) % _TAR_BLOCK)


def tar_sample(okey: str, label: int, pixels: np.ndarray) -> bytes:
    """One veiled sample as tar members: ``<okey>.cls`` then ``<okey>.png`` (webdataset's order)."""
    return (tar_member(f"{okey}.cls", str(int(label)).encode(), TAR_MTIME)
            + tar_member(f"{okey}.png", encode_png(pixels), TAR_MTIME))


def tar_end(size_so_far: int) -> bytes:
    """The end-of-archive blocks, padded to a whole record as ``tarfile`` does."""
    n = size_so_far + 2 * _TAR_BLOCK
    return b"\0" * (2 * _TAR_BLOCK + (-n % _TAR_RECORD))


def read_tar_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Samples ``{"__key__", ext: bytes...}`` of a tar in file order (strict: raises on damage)."""
    current: dict | None = None
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            mt = _TAR_KEY.match(m.name)
            if not mt:
                raise VerifyError(f"{Path(path).name}: unexpected member {m.name!r}")
            key, ext = mt.groups()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = tf.extractfile(m).read()
    if current is not None:
        yield current


# what a content tag that differs means (veil-export's and veil-audit's refusal)
SOURCE_TAG_DIFFERS = ("content tag differs: wrong --originals, or images of it changed in SRC since they were "
                      "veiled (then rerun veil-shard with --recheck-source, which veils them again)")


def source_tag(key: bytes, pixels: np.ndarray, sample_keys: list[bytes] | None = None) -> str:
    """A keyed tag of a shard's source content: the HMAC of the ``keys.sample_digest`` of each
    veiled sample (uint8 ``[N, C, H, W]``, in shard order; hashed normalized, as for the mask).
    ``veil-export`` and ``veil-audit`` recompute it from ``--originals`` to check they are the
    images veiled; it reveals nothing about them without the key. ``sample_keys``: each
    sample's own key where there are several copies (default: ``key`` for all)."""
    lut = normalize_lut()
    ks = sample_keys if sample_keys is not None else [key] * len(pixels)
    return source_tag_of_digests(key, [_keys.sample_digest(k, lut[a]) for k, a in zip(ks, pixels)])


# veils per image that --copies allows (the hardened recipe uses 4)
MAX_COPIES = 64


def check_copies(copies: Any) -> int:
    """``copies`` as an int in [1, MAX_COPIES], or :class:`ShardError`."""
    try:
        k = operator.index(copies)
    except TypeError:
        k = None
    if k is None or isinstance(copies, bool) or not 1 <= k <= MAX_COPIES:
        raise ShardError(f"--copies must be an integer from 1 to {MAX_COPIES}, got {copies!r}")
    return k


def copy_keys_of(key: bytes, copies: int) -> list[bytes]:
    """The key of each copy: ``[key]`` for one copy (what every earlier run did), else (K > 1)
    ``hardened.copy_keys(key, copies)``."""
    copies = check_copies(copies)
    if copies == 1:
        return [key]
    from .hardened import copy_keys

    return copy_keys(key, copies)


class Owned(NamedTuple):
    """What the owner knows of a shard sample: its source item, which copy it is, that copy's key."""
    item: SourceItem
    copy: int
    key: bytes


def opaque_keys(key: bytes, copies: int, items: Iterable[SourceItem]) -> dict[str, Owned]:
    """``{opaque key: Owned(item, copy, copy key)}`` for every copy of every item: how the owner maps
    a shard's samples back to their originals."""
    items = list(items)
    return {_keys.opaque_key(k, it.rel): Owned(it, c, k) for c, k in enumerate(copy_keys_of(key, copies)) for it in items}


@functools.lru_cache(maxsize=1)
def normalize_lut() -> np.ndarray:
    """The normalized float32 value of each uint8 pixel, as the library's normalize() computes it
    (the key's digest hashes those bytes)."""
    import torch

    from . import functional as F

    return F.normalize(torch.arange(256, dtype=torch.uint8)).numpy()


def source_tag_of_digests(key: bytes, digests: Iterable[bytes]) -> str:
    return hmac.new(key, b"veil-source" + b"".join(digests), hashlib.sha256).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- atomic files and the manifest -----------------------------------------------
def fsync_dir(directory: str | os.PathLike) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"), mode)


@contextlib.contextmanager
def manifest_lock(out: Path):
    """An exclusive lock on OUT's manifest (fcntl; released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: single process only
        yield
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_manifest(out: str | os.PathLike) -> dict:
    """OUT's manifest, its structure checked (a damaged one: :class:`ShardError` naming the field)."""
    path = Path(out) / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"no {MANIFEST} in {out}: not a veil-shard output folder") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {path}: {e}") from None
    check_manifest(m, path)
    return _summarise(m)


# what the tools read from a manifest: field -> type (shards' entries: _MANIFEST_SHARD)
_MANIFEST_FIELDS = {"format": str, "veil": dict, "key_fingerprint": str, "num_shards": int, "source": dict,
                    "shards": list}
_MANIFEST_SOURCE = {"listing_sha256": str, "sample_shape": list}
_MANIFEST_SHARD = {"index": int, "name": str, "count": int, "sha256": str, "bytes": int}


def check_manifest(m: Any, path: str | os.PathLike) -> None:
    """Raise :class:`ShardError` (one line: the file and the field) unless ``m`` has a manifest's structure."""
    def need(obj: Any, fields: dict, where: str) -> None:
        for k, t in fields.items():
            if k not in obj:
                raise ShardError(f"{path} is damaged: {where}missing field {k!r} (restore it, or start a new OUT)")
            if not isinstance(obj[k], t) or (t is int and isinstance(obj[k], bool)):
                raise ShardError(f"{path} is damaged: {where}field {k!r} is not a {_JSON_NAMES[t]}")

    if not isinstance(m, dict):
        raise ShardError(f"{path} is damaged: expected a JSON object, got a {_JSON_NAMES.get(type(m), type(m).__name__)}")
    need(m, _MANIFEST_FIELDS, "")
    need(m["source"], _MANIFEST_SOURCE, "source: ")
    if "copies" in m:  # absent in manifests from before --copies: one copy
        try:
            check_copies(m["copies"])
        except ShardError:
            raise ShardError(f"{path} is damaged: field 'copies' is not an integer from 1 to {MAX_COPIES}") from None
    if m.get("order", "sorted") not in ("keyed", "sorted"):  # absent before the keyed order: sorted
        raise ShardError(f"{path} is damaged: field 'order' is not 'keyed' or 'sorted'")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict):
            raise ShardError(f"{path} is damaged: shards[{i}] is not a JSON object")
        need(s, _MANIFEST_SHARD, f"shards[{i}]: ")


_JSON_NAMES = {dict: "JSON object", list: "JSON list", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


SKIP_LINES = 50  # "skipping FILE: why" lines per run (5% corrupt files of millions: in the manifest only)


def _summarise(m: dict) -> dict:
    m["shards"].sort(key=lambda s: s["index"])
    m["skipped"] = [sk for s in m["shards"] for sk in s.get("skipped", [])]
    m["num_veiled"] = sum(s["count"] for s in m["shards"])
    m["num_skipped"] = len(m["skipped"])
    m["complete"] = len(m["shards"]) == m["num_shards"]
    return m


# fields that must match for a rerun to continue an existing OUT
_COMPAT = {
    "format": "the output format",
    "veil": "the veil parameters",
    "model_sha256": "the local model file",
    "key_fingerprint": "the key",
    "shard_size": "--shard-size",
}
_COMPAT_SOURCE = {"listing_sha256": "the source listing (files added, removed or renamed, or labels changed; "
                                    "--recheck-source is for images edited under the same names)",
                  "sample_shape": "the image shape",
                  "classes": "the class names (a class renamed: its shards would keep the old name)"}


def _check_compatible(old: dict, new: dict, out: Path) -> None:
    diffs = []
    for k, what in _COMPAT.items():
        if old.get(k) != new.get(k):
            if k == "veil":
                ov, nv = old.get(k) or {}, new.get(k) or {}
                if {**ov, "model": None} == {**nv, "model": None}:
                    continue  # only the model's file name changed; model_sha256 covers the weights
                d = [f"{n}: {ov.get(n)!r} -> {nv.get(n)!r}" for n in sorted(set(ov) | set(nv)) if ov.get(n) != nv.get(n)]
                diffs.append(f"{what} ({', '.join(d)})")
            elif k == "key_fingerprint":
                diffs.append(f"the key (fingerprint {old.get(k)} there, {new.get(k)} now)")
            elif k == "shard_size":
                diffs.append(f"{what} ({old.get(k)} -> {new.get(k)})")
            else:
                diffs.append(what)
    for k, what in _COMPAT_SOURCE.items():
        if (old.get("source") or {}).get(k) != (new.get("source") or {}).get(k):
            diffs.append(what)
    if old.get("copies", 1) != new.get("copies", 1):  # manifests from before --copies hold one copy
        diffs.append(f"--copies ({old.get('copies', 1)} there, {new.get('copies', 1)} now: "
                     f"rerun with --copies {old.get('copies', 1)})")
    if diffs:
        raise ShardError(
            f"{out} already holds shards made with different settings: {'; '.join(diffs)}. "
            "Rerun with the same settings and key to resume, or use a new OUT"
        )
    if old.get("library_version") != new.get("library_version"):
        log.warning("%s was started with veil_transforms %s, this is %s",
                    out, old.get("library_version"), new.get("library_version"))


class RunLock:
    """A hold on OUT for one run, so that a second run on the same OUT is refused at once instead of
    deleting the first run's shards in progress (fcntl; released by :func:`run`, or when the process
    ends). A one-process run (or ``--nproc``'s parent, whose rank processes take none) holds OUT
    exclusively; torchrun's ranks share it, and each also holds its rank exclusively, so a second
    torchrun launch on the same OUT is refused too."""

    def __init__(self, out: Path, shared: bool = False, rank: int = 0):
        self.fds: list[int] = []
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no check
            return
        holds = [(RUN_LOCK, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)]
        if shared:
            holds.append((f"{RUN_LOCK}.rank-{rank}", fcntl.LOCK_EX))
        for name, how in holds:
            fd = os.open(out / name, os.O_RDWR | os.O_CREAT, 0o644)
            self.fds.append(fd)
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
            except BlockingIOError:
                self.release()
                raise ShardError(f"another veil-shard is running on OUT {out}: let it finish (or stop it), "
                                 "then rerun to resume") from None

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    __del__ = release


# -- the plan: everything validated before any work --------------------------------
@dataclass
class Plan:
    out: Path
    source: Source
    veil: Any  # VeilTransform
    key_file: Path
    key_created: bool
    header: dict
    shard_size: int
    num_shards: int
    copies: int = 1
    lock: Any = field(default=None, repr=False, compare=False)  # the run's hold on OUT (:class:`RunLock`)
    order: list | None = field(default=None, repr=False, compare=False)  # the listing in shard order

    def shard_items(self, i: int) -> list[tuple[SourceItem, int]]:
        """(item, copy) of shard ``i``: a slice of the listing (in its keyed order) taken ``copies``
        times over, copy by copy."""
        items = self.order if self.order is not None else self.source.items
        n = len(items)
        return [(items[j % n], j // n)
                for j in range(i * self.shard_size, min((i + 1) * self.shard_size, n * self.copies))]


# images decoded (spread evenly over the sorted listing) to find the most common height and width
SHAPE_SAMPLE = 33


def _reference_shape(source: Source) -> tuple[int, int, int]:
    """(the most common channel count, the most common height and width among a sample of
    ``SHAPE_SAMPLE`` images): one outlier first in sort order (a grey image in a colour set, another
    size) must not make all the others "size mismatch" or the model "not accept" them (ties go to
    the first decodable image). Images of the other channel count are converted when decoded."""
    items = source.items
    for first, it in enumerate(items):
        try:
            shape = decode_image(source.read_bytes(it)).shape
            break
        except Exception as e:  # noqa: BLE001 - corrupt files are expected here
            log.debug("cannot decode %s: %s", it.rel, e)
    else:
        raise ShardError(f"none of the {len(items)} images in {source.root or 'the source'} could be decoded")
    channels, sizes = Counter({shape[0]: 1}), Counter({shape[1:]: 1})
    picks = np.linspace(first, len(items) - 1, min(len(items) - first, SHAPE_SAMPLE)).round().astype(int)
    for i in sorted(set(picks.tolist()) - {first}):
        with contextlib.suppress(Exception):
            c, *hw = decode_image(source.read_bytes(items[i])).shape
            channels[c] += 1
            sizes[tuple(hw)] += 1
    c = channels.most_common(1)[0][0]
    (h, w), n = sizes.most_common(1)[0]
    if (c, h, w) != shape:
        log.info("reference shape %dx%dx%d (%d of %d sampled images of this size), not the first image's %s",
                 c, h, w, n, sum(sizes.values()), "x".join(map(str, shape)))
    return (c, h, w)


def create_key_file(path: Path) -> bytes:
    """Write a new key file (mode 0600) atomically: it appears whole or not at all.

    Raises FileExistsError if ``path`` exists. Falls back to
    ``keys.read_key_file(create=True)`` where hard links are not supported.
    """
    key = _keys.new_key()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and refuses to replace an existing key
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            return _keys.read_key_file(path, create=True)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return key


def _wait_for_key(path: Path, timeout: float = 300.0) -> bytes:
    t0 = time.monotonic()
    while True:
        try:
            return _keys.read_key_file(path)
        except (FileNotFoundError, ValueError):
            if time.monotonic() - t0 > timeout:
                raise ShardError(f"key file {path} did not appear (rank 0 creates it)") from None
            time.sleep(0.2)


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    model,
    *,
    labels: str | os.PathLike | None = None,
    key_file: str | os.PathLike | None = None,
    arch: str | None = None,
    layer: str | None = None,
    shard_size: int = 1000,
    device=None,
    create_key: bool = True,
    copies: int = 1,
    lock: str | None = "exclusive",
    rank: int = 0,
    **veil_kwargs,
) -> Plan:
    """Validate everything (model, source, shape, OUT, key, resume state) before any work.

    Raises :class:`ShardError` with a one-line message on any bad input.
    ``model`` is a path (TorchScript, state dict with ``arch``, ONNX) or an nn.Module.
    ``copies``: veils per image, each under its own key (see the module docstring).
    ``lock``: the run's hold on OUT (:class:`RunLock`): ``"exclusive"``, ``"shared"`` (rank ``rank`` of
    one torchrun) or None (processes of a run whose parent holds it); released if this raises.
    """
    from .model import LocalModel
    from .transform import VeilTransform

    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ShardError(f"--shard-size must be an integer >= 1, got {shard_size!r}")
    copies = check_copies(copies)
    out = Path(out).absolute()
    # 1. the model
    model_sha = None
    if isinstance(model, (str, os.PathLike)):
        mp = Path(model)
        if mp.is_dir():
            raise ShardError(f"--model {mp} is a folder; give the model file (.pt or .onnx) in it")
        if not mp.is_file():
            raise ShardError(f"model file not found: {mp}")
        try:
            local = LocalModel.load(mp, layer, arch=arch)
        except (ValueError, RuntimeError, OSError, ImportError) as e:
            raise ShardError(f"cannot load model {mp}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        # an ONNX graph's weights may lie in a .onnx.data file beside it: hash them too (LocalModel.load
        # reads them in; for a file without one these are its own bytes, and the hash is the file's)
        loaded = getattr(local, "_source", None)
        model_sha = hashlib.sha256(loaded[1]).hexdigest() if loaded and loaded[0] == "onnx" else file_sha256(mp)
    else:
        local = model
    try:
        veil = VeilTransform(local, key=_keys.new_key(), device=device, layer=layer, **veil_kwargs)
    except (ValueError, TypeError) as e:
        raise ShardError(str(e)) from None
    if model_sha is None:  # an in-memory module: hash its weights
        h = hashlib.sha256()
        for k, v in sorted(veil.local_model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        model_sha = h.hexdigest()
    # 2. the source, and the shape the model must take
    source = open_source(src, labels)
    shape = _reference_shape(source)
    try:
        veil.check_shape(shape)
        if veil.mode == "hardened":  # before OUT is made (veil() checks each batch's images too)
            import torch

            from .hardened import check_pad_secret

            check_pad_secret(veil.p, torch.ones((1, *shape)))
    except ValueError as e:
        raise ShardError(str(e).splitlines()[0]) from None
    # 3. OUT and the key file
    if out.exists() and not out.is_dir():
        raise ShardError(f"OUT {out} exists and is not a folder")
    if is_inside(out, source.root or "/nonexistent-root") and (source.kind != "webdataset" or Path(src).is_dir()):
        # (a source given as one .tar file may have OUT beside it; inside a folder of .tar shards, OUT's
        # shards would join the listing, or its folder make the source read as an ImageFolder)
        raise ShardError(f"OUT {out} must not be inside the source folder {source.root}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ShardError(f"OUT {out} is not writable: {e.strerror or e}") from None
    run_lock = RunLock(out, shared=lock == "shared", rank=rank) if lock is not None else None
    try:
        key_file = Path(key_file).absolute() if key_file is not None else default_key_file(out)
        if is_inside(key_file, out):
            raise ShardError(f"the key file {key_file} must not be inside OUT {out} (OUT may be shared)")
        created = False
        if not key_file.exists() and (out / MANIFEST).exists():
            raise ShardError(
                f"key file {key_file} not found, but {out} was started with a key "
                f"(fingerprint {read_manifest(out).get('key_fingerprint')}): pass that key with --key-file"
            )
        try:
            if key_file.exists() or not create_key:
                key = _keys.read_key_file(key_file) if key_file.exists() else _wait_for_key(key_file)
            else:
                key_file.parent.mkdir(parents=True, exist_ok=True)
                try:
                    key = create_key_file(key_file)
                    created = True
                except FileExistsError:  # another rank was first
                    key = _wait_for_key(key_file)
        except ShardError:
            raise
        except (OSError, ValueError) as e:
            raise ShardError(f"key file {key_file}: {e}") from None
        veil.key = key
        # 4. the manifest header (create, or check that a rerun continues the same job)
        num_shards = (copies * len(source.items) + shard_size - 1) // shard_size
        header = {
            "format": FORMAT,
            "library_version": library_version(),
            "veil": veil.settings,
            "copies": copies,
            "model_sha256": model_sha,
            "key_fingerprint": _keys.key_fingerprint(key),
            "shard_size": shard_size,
            "num_shards": num_shards,
            "order": "keyed",
            "source": {
                "kind": source.kind, "path": source.root, "labels": source.labels_file,
                "num_samples": len(source.items), "classes": source.classes, "sample_shape": list(shape),
                "listing_sha256": source.listing_sha256(), "errors": source.errors,
            },
            "shards": [],
        }
        header = json.loads(json.dumps(header))  # the form it takes on disk
        with manifest_lock(out):
            if (out / MANIFEST).exists():
                old = read_manifest(out)
                if old.get("format") == FORMAT_SORTED:  # started before the keyed order: it keeps its own
                    header.update(format=FORMAT_SORTED, order="sorted")
                _check_compatible(old, header, out)
            else:
                if any(out.glob("veil-*.tar")):
                    raise ShardError(f"OUT {out} holds shards but no {MANIFEST}: use an empty folder")
                atomic_write_json(out / MANIFEST, _summarise(dict(header)))
            for stale in out.glob(f".{MANIFEST}.*.tmp"):  # from a killed manifest write
                with contextlib.suppress(OSError):
                    stale.unlink()
        order = keyed_order(key, source.items) if header["order"] == "keyed" else None
        return Plan(out, source, veil, key_file, created, header, shard_size, num_shards, copies, run_lock, order)
    except BaseException:  # refused (a resume with other settings, a key problem): OUT is free again
        if run_lock is not None:
            run_lock.release()
        raise


ORDER_TAG = b"veil-shard-order"


def keyed_order(key: bytes, items: list[SourceItem]) -> list[SourceItem]:
    """``items`` sorted by ``HMAC(key, ORDER_TAG || relative path)``: an order the key fixes and
    that says nothing about the file names without it."""
    return sorted(items, key=lambda it: hmac.new(key, ORDER_TAG + it.rel.encode("utf-8"), hashlib.sha256).digest())


# -- the engine ---------------------------------------------------------------------
_ADDR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x...>" in PIL errors


def _decode_job(item: SourceItem, shape: tuple[int, int, int]):
    if item.label < 0:
        return None, "no label"
    try:
        arr = decode_image(read_item(item), channels=shape[0])
    except FileNotFoundError:  # named in a labels file, or removed since the listing
        return None, "missing: the file is not there"
    except Exception as e:  # noqa: BLE001 - anything wrong with a file means: skip it
        msg = _ADDR.sub("", str(e).splitlines()[0] if str(e) else "").strip()
        return None, f"corrupt: {type(e).__name__}: {msg}"[:200]
    if arr.shape != shape:
        return None, f"size mismatch: {list(arr.shape)} != {list(shape)}"
    return arr, None


def _decode_chunk(items: list[tuple[SourceItem, int]], shape: tuple[int, int, int], keys: list[bytes], lut: np.ndarray,
                  pad_p: float | None = None):
    """Decode a chunk of (item, copy) and derive the uniforms of the good ones under their copy's
    key (the CPU work before the veil; runs in a decoding thread or an I/O process, without
    torch). ``lut``: the 256 normalized values of uint8 pixels, as the library's normalize()
    computes them (the key's digest hashes those float32 bytes). ``pad_p``: the flip
    probability of a hardened veil, whose pad (as much hashing again) is then derived here too.
    Returns, per item, (pixels, None, uniforms, digest, pad or None) or (None, reason, None,
    None, None); the digest is ``keys.sample_digest`` of the normalized pixels under the copy's
    key (see :func:`source_tag`)."""
    out = [_decode_job(it, shape) for it, _ in items]
    res: list[tuple] = [(a, why, None, None, None) for a, why in out]
    for c in sorted({c for (_, c), (a, _) in zip(items, out) if a is not None}):
        idx = [j for j, ((_, cj), (a, _)) in enumerate(zip(items, out)) if cj == c and a is not None]
        digests: list[bytes] = []
        xn = lut[np.stack([out[j][0] for j in idx])]
        u = _keys.keyed_uniforms_np(keys[c], xn, digests)
        # the library's mask is float32 u < p (torch compares in float32) and its pad bits the flips where x != 0
        pads = _keys.pad_uniforms_np((u < np.float32(pad_p)) & (xn != 0)) if pad_p is not None else [None] * len(idx)
        for j, uj, dj, pj in zip(idx, u, digests, pads):
            res[j] = (out[j][0], None, uj, dj, pj)
    return res


def _encode_rows(okeys: list[str], labels: list[int], pixels: np.ndarray) -> bytes:
    """Tar members (PNG + label) of veiled rows, ready to append to a shard (an I/O process's job)."""
    return b"".join(tar_sample(k, y, a) for k, y, a in zip(okeys, labels, pixels))


# rows per PNG-encoding job sent to an I/O process
ENCODE_ROWS = 256


@contextlib.contextmanager
def _main_not_rerun():
    """While I/O processes are started: multiprocessing's spawn runs the parent's ``__main__``
    (its file, or its module under ``-m``) again in each child, importing whatever it imports
    (torch: ~1-3 s a process, on the first batch's critical path) and, in a script without an
    ``if __name__ == "__main__":`` guard, running the script. The I/O processes run only this
    module's functions, so they are started with a stand-in ``__main__`` that names no file."""
    import sys
    import types

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, __spec__ None
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """In an I/O process or a ``--nproc`` rank process: exit once ``parent`` is gone. A pool's workers
    wait for their next job forever, so after ``kill -9`` of veil-shard they (and multiprocessing's
    resource tracker) stayed; rank processes went on writing into OUT beside the user's rerun."""
    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="veil-exit-with-parent", daemon=True).start()


def auto_io_procs(total: int, world_size: int = 1) -> int:
    """I/O processes for one veil-shard process when not given: none (threads) for small runs,
    several ranks, or machines with few CPUs; else half the CPUs, at most 8. Threads share one GIL, which caps
    decoding, hashing and PNG encoding at ~2.5-4.5k MNIST-sized images/s (H100 runs 5-7: depending on the CPU): below a GPU's veil rate."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if world_size > 1 or cpus < 8 or total < 20_000:
        return 0
    return min(8, cpus // 2)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prefetch(pool: ThreadPoolExecutor, fn, jobs: Iterable, window: int) -> Iterator:
    """``fn(*job)`` for each job, in order, with at most ``window`` running ahead."""
    pending: deque = deque()
    it = iter(jobs)
    for job in it:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= window:
            break
    while pending:
        fut = pending.popleft()
        for job in it:
            pending.append(pool.submit(fn, *job))
            break
        yield fut.result()


class _Writer(threading.Thread):
    """Encodes PNGs and writes shards in the background; finishes shards atomically."""

    def __init__(self, out: Path, on_done):
        super().__init__(name="veil-shard-writer", daemon=True)
        self.out, self.on_done = out, on_done
        self.q: queue.Queue = queue.Queue(maxsize=4)  # of batches (lists of messages): bounds memory
        self.error: BaseException | None = None
        self.throttle = float(os.environ.get(_THROTTLE_ENV, "0") or 0)

    def put(self, group: list[tuple]) -> None:
        """Queue one batch's messages; waits while the writer is 4 batches behind, raises its error."""
        while True:
            if self.error is not None:
                raise RuntimeError(f"shard writer failed: {self.error}") from self.error
            try:
                self.q.put(group, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        shard = None
        try:
            while True:
                group = self.q.get()
                if group is None:
                    return
                for msg in group:  # one batch's messages, in order
                    kind = msg[0]
                    if kind == "begin":
                        shard = _OpenShard(self.out, msg[1])
                    elif kind == "encoded":  # (n, future of the tar bytes of n samples) from an I/O process
                        _, n, fut = msg
                        shard.write(fut.result(), n)
                    elif kind == "batch":
                        _, okeys, labels, pixels = msg
                        if self.throttle:
                            for k, y, a in zip(okeys, labels, pixels):
                                shard.write(tar_sample(k, y, a), 1)
                                time.sleep(self.throttle)
                        else:
                            shard.write(b"".join(tar_sample(k, y, a) for k, y, a in zip(okeys, labels, pixels)), len(okeys))
                    elif kind == "end":  # (index, skipped, source tag): the index is the open shard's
                        self.on_done(shard.finish(msg[2], msg[3]))
                        shard = None
        except BaseException as e:  # noqa: BLE001 - reported to the veil loop
            self.error = e
            if shard is not None:
                with contextlib.suppress(Exception):
                    shard.f.close()  # its temporary file stays; the next run on OUT removes it and redoes the shard
            # drain so the producer never blocks
            while True:
                try:
                    if self.q.get(timeout=0.1) is None:
                        return
                except queue.Empty:
                    pass


class _OpenShard:
    """One shard being written: a hidden temporary file, hashed as written (not read back for its sha256),
    moved into place whole by :meth:`finish`."""

    def __init__(self, out: Path, index: int):
        self.out, self.index = out, index
        self.tmp = out / f".{shard_name(index)}.tmp"
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.count = self.size = 0

    def write(self, data: bytes, n: int) -> None:
        """``n`` samples' tar records."""
        self.h.update(data)
        self.size += self.f.write(data)
        self.count += n

    def finish(self, skipped: list, tag: str | None = None) -> dict:
        """Ends the tar, makes the file durable and puts it in place; returns its manifest entry."""
        data = tar_end(self.size)
        self.h.update(data)
        self.f.write(data)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        final = self.out / shard_name(self.index)
        sha, nbytes = self.h.hexdigest(), self.tmp.stat().st_size
        os.replace(self.tmp, final)
        fsync_dir(self.out)
        return {"index": self.index, "name": final.name, "count": self.count, "sha256": sha,
                "bytes": nbytes, "skipped": skipped, "source_tag": tag}


def record_shards(out: Path, entries: list[dict]) -> dict:
    """Add finished shards to the manifest (atomically, under the lock)."""
    return _update_shards(out, {e["index"] for e in entries}, entries)


def unrecord_shards(out: Path, indices: list[int]) -> dict:
    """Drop shards from the manifest (to be written again): OUT reads incomplete until they are."""
    return _update_shards(out, set(indices), [])


def _update_shards(out: Path, drop: set[int], add: list[dict]) -> dict:
    with manifest_lock(out):
        m = read_manifest(out)
        m["shards"] = [s for s in m["shards"] if s["index"] not in drop] + list(add)
        m = _summarise(m)
        atomic_write_json(out / MANIFEST, m)
    return m


# The manifest is rewritten whole for each record (read, merge with other ranks' shards, fsync): its
# cost grows with the shards in it (9-15 ms at 1,000 shards, 24-35 ms at 3,000 on a 2-core CPU:
# benchmarks/manifest_records.py), so recording every shard is quadratic over a run.
# A shard is recorded at once unless the last record was less than this many times its own cost
# ago; then it waits for the next one (at the latest, the end of the run). The records take at most
# ~1/MANIFEST_SPACING of the writer's time; a kill loses at most that spacing's shards from the
# manifest (their files are rewritten on resume: nothing lost or duplicated).
MANIFEST_SPACING = 20


class ManifestRecorder:
    """Records finished shards in OUT's manifest, spaced by the records' cost (``MANIFEST_SPACING``)."""

    def __init__(self, out: Path):
        self.out, self.pending, self.manifest = out, [], {}
        self.at = self.cost = self.seconds = 0.0  # last record: when, and what it cost; all records' time
        self.records = 0

    def add(self, entry: dict) -> None:
        """A shard whose file is in place: recorded now, or with the next record."""
        self.pending.append(entry)
        if time.perf_counter() - self.at >= MANIFEST_SPACING * self.cost:
            self.flush()

    def flush(self) -> None:
        """Record the waiting shards (at the end of a run, also of a failed one: their files are whole)."""
        if self.pending:
            t = time.perf_counter()
            self.manifest = record_shards(self.out, self.pending)
            self.pending.clear()
            self.at = time.perf_counter()
            self.cost = self.at - t
            self.records += 1
            self.seconds += self.cost


# a resume shows a bar while it re-hashes finished shards once they hold this much
CHECK_BAR_BYTES = 256 << 20


def done_shards(plan: Plan, rank: int = 0, world_size: int = 1, progress: bool = False,
                recheck_source: bool = False) -> set[int]:
    """Shards recorded in the manifest whose files are still there, whole and unchanged (sha256):
    this rank's are checked (the others' are their ranks' to check) and any other is written again.
    The files are hashed by up to 8 threads (hashlib releases the GIL; benchmarks/resume_check.py),
    with a progress bar from ``CHECK_BAR_BYTES`` on. ``recheck_source``: also decode each finished
    shard's source images and write again a shard whose content tag they no longer give (an image
    edited in SRC under the same name; the listing alone does not show it)."""
    from .progress import bar

    m = read_manifest(plan.out)
    done = {s["index"] for s in m["shards"] if s["index"] % world_size != rank}
    mine = [s for s in m["shards"] if s["index"] % world_size == rank]
    owned = opaque_keys(plan.veil.key, plan.copies, plan.source.items) if recheck_source else {}
    shape = tuple(plan.header["source"]["sample_shape"])

    untagged = sum(1 for s in mine if s.get("source_tag") is None) if recheck_source else 0
    if untagged:
        log.warning("--recheck-source: %d finished shard(s) have no content tag (written by an earlier version) "
                    "and cannot be compared with SRC: veiling them again (the same bytes where SRC is unchanged)",
                    untagged)

    def source_changed(f: Path, s: dict) -> bool:
        if s.get("source_tag") is None:
            return True  # made before tags were recorded: nothing to compare with, so veiled again
        for sk in s.get("skipped") or []:  # a file skipped then (corrupt, another size) that is fine now
            it = owned.get(sk.get("key"))
            if it is not None and _decode_job(it.item, shape)[0] is not None:  # (as the writer decides)
                return True
        keys = [smp["__key__"] for smp in read_tar_samples(f)]
        if not keys:
            return False
        x = [_decode_job(owned[k].item, shape)[0] for k in keys]  # as the writer decodes them
        if any(a is None for a in x):  # unreadable or reshaped now: veil it again (it is skipped then)
            return True
        return source_tag(plan.veil.key, np.stack(x), [owned[k].key for k in keys]) != s["source_tag"]

    def check(s: dict) -> str | None:  # why the shard must be written again, or None
        f = plan.out / s["name"]
        if not (f.is_file() and f.stat().st_size == s["bytes"]):
            return "is listed in the manifest but missing or damaged"
        if file_sha256(f) != s["sha256"]:
            return "differs from its sha256 in the manifest (changed since it was written)"
        if recheck_source and source_changed(f, s):
            return ("has no content tag to check SRC against" if s.get("source_tag") is None else
                    "was veiled from images that have changed in SRC since (content tag differs)")
        return None

    total = sum(s["bytes"] for s in mine)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="veil-check") as pool, \
            bar(total=total, desc="checking finished shards" + (" and their sources" if recheck_source else ""),
                unit="B", unit_scale=True, disable=not progress or (total < CHECK_BAR_BYTES and not recheck_source)) as pb:
        redo = []
        for s, why in zip(mine, pool.map(check, mine)):
            if why is None:
                done.add(s["index"])
            else:
                log.warning("shard %s %s: writing it again", s["name"], why)
                redo.append(s["index"])
            pb.update(s["bytes"])
    if redo:  # not finished until written again: a run stopped before then leaves OUT incomplete
        unrecord_shards(plan.out, redo)  # (an intact file of old veils would otherwise still verify)
    return done


def run(plan: Plan, **kw) -> dict:
    """:func:`_run` (see there), then the run's hold on OUT is released."""
    try:
        return _run(plan, **kw)
    finally:
        if plan.lock is not None:
            plan.lock.release()


def _run(plan: Plan, *, rank: int = 0, world_size: int = 1, batch_size: int = 256,
         io_workers: int | None = None, io_procs: int | None = 0, progress: bool = True,
         recheck_source: bool = False) -> dict:
    """Veil and write this rank's unfinished shards. Returns a summary dict.

    ``io_workers`` decoding threads (None or 0: min(8, CPUs), at least 2); ``io_procs`` processes for
    decoding, key hashing and PNG encoding instead (0: none, threads only; None:
    :func:`auto_io_procs`, the CLI's default). Processes are spawned (without rerunning the
    calling script, see :func:`_main_not_rerun`) and cost a fraction of a second to start; they
    pay off when the GPU veils faster than one Python process can decode and encode (small images)."""
    import torch

    from .progress import bar

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ShardError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not (0 <= rank < world_size):
        raise ShardError(f"rank {rank} out of range for world size {world_size}")
    if io_workers is not None and (not isinstance(io_workers, int) or io_workers < 0):
        raise ShardError(f"--io-workers must be an integer >= 0 (0: automatic), got {io_workers!r}")
    out, veil = plan.out, plan.veil
    shape = tuple(plan.header["source"]["sample_shape"])
    done = done_shards(plan, rank, world_size, progress=progress and rank == 0, recheck_source=recheck_source)
    mine = [i for i in range(plan.num_shards) if i % world_size == rank and i not in done]
    for i in range(plan.num_shards):  # leftovers of killed runs (only this rank's shards)
        if i % world_size == rank:
            with contextlib.suppress(FileNotFoundError):
                (out / f".{shard_name(i)}.tmp").unlink()
    t0 = time.perf_counter()
    total = sum(len(plan.shard_items(i)) for i in mine)
    stats = {"shards": 0, "veiled": 0, "skipped": 0, "veil_s": 0.0, "writer_wait_s": 0.0, "warm_up_s": None,
             "first_flush": None}
    recorder = ManifestRecorder(out)

    def on_done(entry):  # on the writer thread, after the shard's file is in place
        stats["shards"] += 1
        log.info("wrote %s (%d samples, %d skipped)", entry["name"], entry["count"], len(entry["skipped"]))
        recorder.add(entry)

    if mine:
        log.info("rank %d/%d: %d of %d shards to write (%d images)", rank, world_size, len(mine),
                 plan.num_shards, total)
    if io_procs is None:
        io_procs = auto_io_procs(total, world_size)
    if not isinstance(io_procs, int) or io_procs < 0:
        raise ShardError(f"--io-procs must be an integer >= 0, got {io_procs!r}")
    workers = io_procs or io_workers or min(8, max(2, (os.cpu_count() or 2)))
    procs = None
    if io_procs and mine:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: this process has CUDA and threads
        procs = ProcessPoolExecutor(io_procs, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_exit_with_parent, initargs=(os.getpid(),))
        with _main_not_rerun():  # start them all now (one per submitted job), while the stub is in place
            for _ in range(io_procs):
                procs.submit(int)
        log.info("rank %d: %d I/O processes", rank, io_procs)
    writer = _Writer(out, on_done)
    writer.start()
    inflight: deque = deque()
    # Once anything failed, the veil thread's queued tasks do nothing: an "end" queued behind a
    # failed batch must not finish (and record) a shard that lacks that batch.
    failed = threading.Event()

    def on_gpu_thread(fn, *args):  # everything for the writer goes through here, in submission order
        if failed.is_set():
            return
        try:
            fn(*args)
        except BaseException:
            failed.set()
            raise

    def warm_up(n):  # on the GPU thread, first: overlaps the I/O workers' start and the first decoding
        t = time.perf_counter()
        try:
            if veil.warm_up(n, shape):
                stats["warm_up_s"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - the first batch does the same work, and raises if it must
            log.warning("warm-up failed (%s: %s); the first batch warms up instead", type(e).__name__, e)

    def veil_and_write(x, u, pad, msgs):
        """Veil one batch, then hand the writer its messages in order: ("rows", okeys, labels)
        stands for the batch's next len(okeys) veiled images (a batch may span shards)."""
        t = time.perf_counter()
        v = veil.veil_batch(x, u, pad_uniforms=pad).cpu().numpy() if x is not None else None
        t1 = time.perf_counter()
        stats["veil_s"] += t1 - t  # only this thread writes these
        if v is not None:
            marks.append((t1, len(v) + (marks[-1][1] if marks else 0)))
        r = 0
        group = []
        for m in msgs:
            if m[0] != "rows":
                group.append(m)
                continue
            n = len(m[1])
            if procs is None:
                group.append(("batch", m[1], m[2], list(v[r : r + n])))
            else:
                for j in range(0, n, ENCODE_ROWS):
                    k = min(n, j + ENCODE_ROWS)
                    group.append(("encoded", k - j, procs.submit(_encode_rows, m[1][j:k], m[2][j:k], v[r + j : r + k])))
            r += n
        # One put per batch: the writer's queue holds batches, so this thread (and the GPU) waits
        # only when the writer is several batches behind, not on each encoding job and each shard's
        # fsync (a queue of single messages made it wait ~0.1 s per batch of 4,096 small images).
        t2 = time.perf_counter()
        writer.put(group)
        stats["writer_wait_s"] += time.perf_counter() - t2

    # (time, images veiled so far) as each batch leaves veil_batch, on the GPU thread: the main thread
    # sees a batch finish only when it next flushes, up to one batch's decoding later (with threads)
    marks: list[tuple[float, int]] = []

    def drain(limit: int, pb) -> None:
        while len(inflight) > limit:
            fut, n = inflight.popleft()
            fut.result()  # re-raises the veil's or the writer's error here
            stats["veiled"] += n
            pb.update(n)

    try:
        # Three stages overlap: decoding threads, one thread driving the GPU (the veil), and the
        # writer (PNG + tar). This thread batches decoded images and derives their keyed masks (CPU
        # hashing) while the previous batch is on the GPU. Messages to the writer all go through
        # the veil thread, so they keep their order. Batches run across shard boundaries (a shard
        # of 1,000 images must not cap a batch of 4,096), so a shard ends in the message list of
        # the batch that holds its last images.
        with (procs or ThreadPoolExecutor(max_workers=workers, thread_name_prefix="veil-decode")) as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-gpu") as gpu, \
                bar(total=total, desc=f"veiling (rank {rank})" if world_size > 1 else "veiling",
                    disable=not progress or rank != 0) as pb:
            try:
                # 32 images per decoding job: one future per image cost ~30 us of this thread each
                # (items only, not the Source: an I/O process would be sent its whole listing per job)
                lut = normalize_lut()
                ckeys = copy_keys_of(veil.key, plan.copies)
                pad_p = veil.p if veil.mode == "hardened" else None  # its pad too, off the GPU thread
                chunked = ((items, shape, ckeys, lut, pad_p)
                           for items in _chunks((it for i in mine for it in plan.shard_items(i)), 32))
                decoded = (r for rs in _prefetch(pool, _decode_chunk, chunked, window=(2 * batch_size) // 32 + 2 * workers) for r in rs)
                batch: list[np.ndarray] = []
                ubatch: list[np.ndarray] = []
                pbatch: list[np.ndarray] = []
                msgs: list[tuple] = []  # the writer's messages up to and including this batch's rows

                if total:
                    gpu.submit(warm_up, min(batch_size, total))

                def flush():
                    if stats["first_flush"] is None:
                        stats["first_flush"] = time.perf_counter() - t0
                    x = u = pad = None
                    if batch:
                        x = torch.from_numpy(np.stack(batch))
                        u = torch.from_numpy(np.stack(ubatch))
                        pad = torch.from_numpy(np.stack(pbatch)) if pbatch else None
                        ubatch.clear()
                        pbatch.clear()
                    fut = gpu.submit(on_gpu_thread, veil_and_write, x, u, pad, list(msgs))
                    inflight.append((fut, len(batch)))
                    batch.clear()
                    msgs.clear()
                    drain(1, pb)  # at most one batch waiting behind the one on the GPU

                warned_skip: set[str] = set()
                # "skipping FILE" lines: each rank says its own, SKIP_LINES in all, and a rank with a share
                # says when it leaves some unsaid
                cap = SKIP_LINES // world_size + (rank < SKIP_LINES % world_size)
                for i in mine:
                    msgs.append(("begin", i))
                    skipped: list[dict] = []
                    digests: list[bytes] = []
                    for it, c in plan.shard_items(i):
                        arr, why, uni, digest, pad = next(decoded)
                        if arr is None:
                            skipped.append({"path": it.rel, "key": _keys.opaque_key(ckeys[c], it.rel), "reason": why})
                            if it.rel not in warned_skip:  # once per file, not once per copy
                                warned_skip.add(it.rel)
                                if len(warned_skip) <= cap:
                                    log.warning("skipping %s: %s", it.rel, why)
                                elif len(warned_skip) == cap + 1 and cap:
                                    log.warning("skipping more files: listed in manifest.json only")
                            stats["skipped"] += 1
                            pb.update(1)
                            continue
                        if not msgs or msgs[-1][0] != "rows":
                            msgs.append(("rows", [], []))
                        msgs[-1][1].append(_keys.opaque_key(ckeys[c], it.rel))
                        msgs[-1][2].append(it.label)
                        batch.append(arr)
                        ubatch.append(uni)
                        if pad is not None:
                            pbatch.append(pad)
                        digests.append(digest)
                        if len(batch) == batch_size:
                            flush()
                    msgs.append(("end", i, skipped, source_tag_of_digests(veil.key, digests)))
                if msgs:
                    flush()
                drain(0, pb)
            except BaseException:
                # before the executors' exits wait for their queues: queued veil batches are skipped
                # (on_gpu_thread), queued decoding is cancelled
                failed.set()
                pool.shutdown(wait=False, cancel_futures=True)
                gpu.shutdown(wait=False, cancel_futures=True)
                raise
    except BaseException as e:
        failed.set()  # also on this thread's errors and Ctrl-C: queued writer messages are dropped
        from concurrent.futures.process import BrokenProcessPool

        cause = e
        while cause is not None and not isinstance(cause, BrokenProcessPool):
            cause = cause.__cause__
        if cause is not None:  # seen here or first by the writer (an encoding job)
            raise RuntimeError(
                "an I/O process died (killed for memory, or crashed); rerun to resume, "
                "or use io_procs=0 (--io-procs 0) for threads"
            ) from e
        raise
    finally:
        with contextlib.suppress(Exception):
            writer.q.put(None, timeout=60)
        writer.join()
        try:
            recorder.flush()
        except Exception as e:  # noqa: BLE001 - raised, unless another error is on its way
            if not failed.is_set():
                raise
            log.warning("could not record %d finished shards in the manifest (%s); a rerun writes them again",
                        len(recorder.pending), e)
    if writer.error is not None:
        raise RuntimeError(f"shard writer failed: {writer.error}") from writer.error
    m = recorder.manifest or read_manifest(out)
    t1 = time.perf_counter()
    return {
        "out": str(out), "rank": rank, "world_size": world_size, "shards_written": stats["shards"],
        "images_veiled": stats["veiled"], "images_skipped": stats["skipped"], "seconds": t1 - t0,
        # after the first batch (start-up, warm-up, compilation): the rate a long run settles at
        "steady_img_s": (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]) if len(marks) >= 3 else None,
        # where a run's time went: until the first batch was decoded and handed to the GPU thread
        # (I/O workers' start, decoding), the GPU's warm-up on a dummy batch meanwhile (None off CUDA),
        # until the first batch was veiled, in veil_batch (GPU-bound when close to "seconds"), after
        # the last batch (encoding and writing the last shards); writer_wait_s: the GPU thread blocked
        # on a full writer queue (the writer behind by several batches: the disk or the encoding)
        "timings": {"first_batch_decoded_s": stats["first_flush"], "warm_up_s": stats["warm_up_s"],
                    "first_batch_s": marks[0][0] - t0 if marks else None, "veil_s": stats["veil_s"],
                    "writer_wait_s": stats["writer_wait_s"],
                    "after_last_batch_s": t1 - marks[-1][0] if marks else None},
        "complete": bool(m.get("complete")), "num_shards": plan.num_shards,
        "total_veiled": m.get("num_veiled", 0), "total_skipped": m.get("num_skipped", 0),
    }


def write_shards(src, out, model, *, rank: int = 0, world_size: int = 1, batch_size: int = 256,
                 io_workers: int | None = None, io_procs: int | None = 0, progress: bool = True,
                 recheck_source: bool = False, **kw) -> dict:
    """:func:`prepare` then :func:`run`: veil SRC into WebDataset shards in OUT (see the module docstring)."""
    t = time.perf_counter()
    kw.setdefault("lock", "shared" if world_size > 1 else "exclusive")
    plan = prepare(src, out, model, create_key=rank == 0, rank=rank, **kw)
    t = time.perf_counter() - t
    summary = run(plan, rank=rank, world_size=world_size, batch_size=batch_size, io_workers=io_workers,
                  io_procs=io_procs, progress=progress, recheck_source=recheck_source)
    summary["timings"]["prepare_s"] = t  # listing the source, the key, the manifest, F on the device
    return summary


# -- verification -------------------------------------------------------------------
def verify(out: str | os.PathLike, *, require_complete: bool = True) -> dict:
    """Check every shard in OUT against its manifest (sha256, sample counts, keys). Returns the manifest."""
    out = Path(out)
    m = read_manifest(out)
    problems = []
    if require_complete and not m.get("complete"):
        problems.append(f"only {len(m['shards'])} of {m['num_shards']} shards are finished (veil-shard is still "
                        "running, or was stopped: rerun it to finish)")
    seen: set[str] = set()
    for s in m["shards"]:
        f = out / s["name"]
        if not f.is_file():
            problems.append(f"{s['name']}: missing")
            continue
        if file_sha256(f) != s["sha256"]:
            problems.append(f"{s['name']}: sha256 differs from the manifest (changed or damaged since written; "
                            "rerunning veil-shard writes it again)")
            continue
        try:
            n = 0
            for smp in read_tar_samples(f):
                n += 1
                if "png" not in smp or "cls" not in smp:
                    problems.append(f"{s['name']}: sample {smp['__key__']} lacks png or cls")
                if smp["__key__"] in seen:
                    problems.append(f"{s['name']}: duplicate sample {smp['__key__']}")
                seen.add(smp["__key__"])
        except (tarfile.TarError, VerifyError, OSError) as e:
            problems.append(f"{s['name']}: unreadable ({e})")
            continue
        if n != s["count"]:
            problems.append(f"{s['name']}: {n} samples, the manifest says {s['count']}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise VerifyError(f"{out} does not match its manifest: " + "; ".join(problems[:5]) + more)
    return m


# -- reading ------------------------------------------------------------------------
def shard_urls(urls) -> list[str] | str:
    """A folder (its manifest.json / receipt.json, else its *.tar), a list of paths, a path or a brace pattern."""
    if isinstance(urls, (str, os.PathLike)):
        p = Path(urls)
        if p.is_dir():
            for name in (MANIFEST, RECEIPT):
                if (p / name).is_file():
                    meta = read_manifest(p) if name == MANIFEST else _read_receipt(p / name)
                    names = [s["name"] for s in sorted(meta["shards"], key=lambda s: s.get("index", 0))]
                    if not names:
                        raise ValueError(f"{p / name} lists no finished shards")
                    return [str(p / n) for n in names]
            tars = sorted(str(t) for t in p.glob("*.tar"))
            if not tars:
                raise FileNotFoundError(f"no shards in {p}")
            return tars
        return str(urls) if "{" in str(urls) else [str(urls)]
    out = [str(u) for u in urls]
    if not out:
        raise ValueError("no shard urls given")
    return out


def _read_receipt(path: Path) -> dict:
    """A DEST's receipt.json, checked for the shard list the reader needs."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise ShardError(f"{path} is damaged: missing field 'shards' (a list)")
    for i, s in enumerate(meta["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str)):
            raise ShardError(f"{path} is damaged: shards[{i}] has no 'name'")
    return meta


class _ToTuple:
    """webdataset sample -> (image, label[, key]); a class so DataLoader workers can pickle it."""

    def __init__(self, decode: bool, with_keys: bool):
        self.decode, self.with_keys = decode, with_keys

    def __call__(self, sample: dict):
        import torch

        where = f"{sample.get('__url__', 'a shard')}: sample {sample.get('__key__')}"
        if "png" not in sample or "cls" not in sample:
            raise ShardError(f"{where} lacks its {'png' if 'png' not in sample else 'cls'}")
        img = sample["png"]
        try:
            if self.decode:
                img = torch.from_numpy(decode_image(img))
            y = int(sample["cls"].decode() if isinstance(sample["cls"], (bytes, bytearray)) else sample["cls"])
        except Exception as e:  # noqa: BLE001 - PIL names only a BytesIO: say which file and sample
            raise ShardError(f"{where}: cannot decode it ({type(e).__name__}: {_one_line(e)})") from e
        return (img, y, sample["__key__"]) if self.with_keys else (img, y)


_AT_STREAM = re.compile(r"\s*@\s*<[^<>]*>")  # webdataset appends " @ <_io.BufferedReader name=...>"


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if e.args else str(e)
    return _ADDR.sub("", _AT_STREAM.sub("", " ".join(msg.split()))).strip()


def reraise_named(exn: BaseException) -> bool:
    """webdataset error handler: raise :class:`ShardError` naming the shard (webdataset's own
    message names a stream object), e.g. a file that is not a tar or a truncated one."""
    if isinstance(exn, ShardError):
        raise exn
    url = getattr(exn, "filename", None) if isinstance(exn, OSError) else None  # a missing file: its path
    if url is None and len(exn.args) >= 2 and isinstance(exn.args[-1], str):  # webdataset appends the url
        url = exn.args[-1]
    msg = exn.strerror if isinstance(exn, OSError) and exn.strerror else _one_line(exn)
    raise ShardError(f"cannot read shard {url or '(unknown)'}: {type(exn).__name__}: {msg}") from exn


def load(
    urls,
    *,
    decode: bool = True,
    shuffle: int = 0,
    split_by_node: bool = False,
    shard_shuffle: bool | None = None,
    seed: int | None = 0,
    with_keys: bool = False,
    handler=None,
):
    """A ``webdataset.WebDataset`` over veiled shards yielding ``(uint8 [C, H, W] tensor, int label)``.

    Args:
        urls: an OUT / DEST folder (its manifest or receipt lists the shards), a
            list of tar paths, one path, or a brace pattern (``".../veil-{000000..000009}.tar"``).
        decode: False yields the PNG bytes instead of a tensor.
        shuffle: sample shuffle buffer size (0: keep the shard order).
        split_by_node: split shards over DDP ranks (``webdataset.split_by_node``);
            without it, a multi-rank job raises (each rank would see everything).
        shard_shuffle: shuffle the shard order too (default: when ``shuffle`` > 0).
        seed: seed for both shuffles (None: different every time).
        with_keys: also yield each sample's opaque key.
        handler: webdataset error handler (default: :func:`reraise_named`, a :class:`ShardError`
            naming the shard file; a sample that cannot be decoded raises one naming the
            file and the sample key).

    Shards are split over DataLoader workers; with more workers than shards some get none.
    """
    import webdataset as wds

    shard_shuffle = bool(shuffle) if shard_shuffle is None else shard_shuffle
    ds = wds.WebDataset(
        shard_urls(urls),
        shardshuffle=100 if shard_shuffle else False,
        detshuffle=seed is not None,
        seed=seed,
        nodesplitter=wds.split_by_node if split_by_node else wds.single_node_only,
        workersplitter=wds.split_by_worker,
        handler=handler or reraise_named,
        empty_check=False,
    )
    _close_shard_files(ds)
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed) if seed is not None else ds.shuffle(shuffle)
    return ds.map(_ToTuple(decode, with_keys))


def _close_shard_files(ds) -> None:
    """Make ``ds`` close each shard file once read, or when iteration stops early.

    webdataset's opener leaves closing to the garbage collector: every shard read (or a loop
    left with ``break``) ends in a ``ResourceWarning: unclosed file``, an error under
    ``-W error``. Its opener stage is wrapped in place; a webdataset without that stage is
    left as it is.
    """
    for i, stage in enumerate(getattr(ds, "pipeline", [])):
        if type(stage).__name__ in ("StreamingOpen", "FileCache"):
            ds.pipeline[i] = _ClosingOpener(stage)
            return


class _ClosingOpener:
    """Wraps a webdataset opener stage: closes a shard's stream when the next is asked for or the loop ends."""

    def __init__(self, opener):
        self.opener = opener

    def __call__(self, urls):
        opened = self.opener(urls)
        try:
            for source in opened:
                try:
                    yield source
                finally:
                    stream = source.get("stream") if isinstance(source, dict) else None
                    if stream is not None:
                        stream.close()
        finally:
            opened.close()
