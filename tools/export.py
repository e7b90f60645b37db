"""veil-export: check veiled shards and copy what a third party may see into DEST.

    veil-export SHARDS DEST --originals SRC [--max-ssim 0.05] [--max-attack-ssim 0.3] [--max-attack-gain 0.1]

1. Verifies every shard in SHARDS (a veil-shard OUT) against its manifest:
   sha256, sample counts, unique keys. Any mismatch: exit 1.
2. With ``--originals`` (the SRC given to veil-shard; the key file maps opaque
   keys back to it) runs the privacy gate on every sample: SSIM(x, x~) must
   be <= --max-ssim and the best attack's SSIM <= --max-attack-ssim, unless
   the attacks recover no more than --max-attack-gain of what a flat image of
   the sample (black, grey, white or its own mean level, scored against the
   same references) leaves unexplained (large or smooth images: a flat image
   alone scores over 0.3; benchmarks/results/gate_calibration.md). The attacks come from
   ``veil_transforms.audit.run`` when that exists, else the fold attack
   ``|2 x~ - 1|``. Shards with several veils per image (veil-shard --copies K)
   also get the averaging attack: the mean of each image's K veils (which a
   third party can link by position) must pass the same attack rule. Over-threshold samples are listed by opaque key
   and nothing is exported (exit 1) unless ``--force``. Before that, each shard's
   originals must give the content tag veil-shard recorded (a keyed hash of the
   pixels it veiled): other images under the same names are refused (exit 2), as are
   veiled images removed from SRC since and changed labels; images added since are
   not in the shards (a warning).
3. Writes DEST/veil-NNNNNN.tar with only the re-encoded veiled PNG (no
   metadata), the label and the opaque key, plus DEST/receipt.json (counts,
   sha256, veil parameters, gate results; never the key or file names).
   The private map (file name <-> opaque key) goes OUTSIDE DEST (default:
   ``<SHARDS>.private-map.csv`` beside SHARDS).

DEST is assembled in a hidden folder beside it (``.DEST.partial``) and renamed
into place at the end, after the private map is written (its path is checked
before any work), so a failed or refused export leaves no DEST behind and no
DEST without its map. The hidden folder keeps each gated shard with its scores
(opaque keys and numbers, no names) until DEST is complete: a stopped, failed or
refused export rerun on the same shards and originals gates only what is left
(a refusal rerun with --force or other bars computes nothing again); delete it
to start over. One export at a time per DEST.
Exit codes: 0 exported, 1 verification failed or gate refused, 2 bad input
(including I/O errors such as an unwritable DEST parent, and --originals that
are not the images veiled).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from veil_transforms import keys as _keys
from veil_transforms import shards

from ._common import debug, disk_full, fail, int_at_least, setup_logging, unwritable_folder

PROG = "veil-export"
EPS = 1e-9  # SSIM of identical images can come out a hair above 1.0
MAX_ATTACK_GAIN = 0.1  # audit.DEFAULT_MAX_GAIN (benchmarks/results/gate_calibration.md); not imported: see _audit_runner
log = logging.getLogger("veil_transforms.export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Verify veiled shards, run the privacy gate, and export them for a third party.",
        epilog="Exit codes: 0 exported, 1 verification failed or gate refused, 2 bad input or I/O error "
               "(an unwritable DEST parent, a full disk; --originals whose pixels are not the images veil-shard veiled: content tag differs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("shards", metavar="SHARDS", help="a veil-shard output folder (with manifest.json)")
    p.add_argument("dest", metavar="DEST", help="new (or empty) folder for the third party: assembled beside it in .DEST.partial, then renamed into place (so not a mount point; its folder must be writable)")
    p.add_argument("--originals", default=None,
                   help="the SRC given to veil-shard: enables the privacy gate and the private map")
    p.add_argument("--labels", default=None, help="labels CSV of a flat SRC; None: the one veil-shard used")
    p.add_argument("--key-file", default=None, help="the key veil-shard used; None: <SHARDS>.key beside SHARDS")
    p.add_argument("--max-ssim", type=float, default=0.05, help="largest SSIM(x, x~) allowed per sample")
    p.add_argument("--max-attack-ssim", type=float, default=0.3,
                   help="largest SSIM between an attack's reconstruction and x allowed per sample (and per image "
                        "for the mean of its veils, with veil-shard --copies)")
    p.add_argument("--max-attack-gain", type=float, default=MAX_ATTACK_GAIN,
                   help="a sample over --max-attack-ssim passes if the attacks recover no more than this share of "
                        "what a flat image of it (black, grey, white or its own mean level, scored against the same "
                        "references) leaves unexplained, (SSIM - flat) / (1 - flat): on large or smooth images a flat "
                        "image scores over 0.3 by itself. -2: the absolute bar alone")
    p.add_argument("--force", action="store_true",
                   help="export even if samples fail the gate, or with no gate shards of the paper's veil (recorded in the receipt)")
    p.add_argument("--private-map", default=None,
                   help="where to write the file name <-> opaque key map; None: <SHARDS>.private-map.csv beside SHARDS; never inside DEST")
    p.add_argument("--threads", type=int_at_least(1), default=min(8, os.cpu_count() or 1),
                   help="threads for the gate's attacks (the export's slow part)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or notes; warnings about what the third party gets (no gate, duplicate "
                        "veils), errors and the summary line still print")
    return p


# -- attacks ----------------------------------------------------------------------
def fold(v: np.ndarray) -> np.ndarray:
    """The fold attack: ``|2 v / 255 - 1|`` in [0, 1] (undoes the sign of a pixel flip)."""
    return np.abs(2.0 * np.asarray(v, dtype=np.float64) / 255.0 - 1.0)


def fold_attack_ssim(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-sample SSIM(fold(x~), fold(x)) for uint8 batches ``[N, C, H, W]``."""
    from veil_transforms.metrics import ssim

    return ssim(fold(x), fold(v))


def _audit_runner():
    """``veil_transforms.audit.run`` if it exists (and has a usable report), else None."""
    try:
        from veil_transforms import audit  # import errors fall back to the fold attack
    except ImportError:
        return None
    run = getattr(audit, "run", None)
    return run if callable(run) else None


MIN_PART = 16  # samples per thread at the least


def attack_ssim(x: np.ndarray, v: np.ndarray, state: dict, threads: int = 1, *, with_gain: bool = False):
    """Per-sample max attack SSIM: the audit's when available, else the fold attack's. With
    ``with_gain``: ``(scores, gains)``, a sample's gain being the share of what a flat image of it
    leaves unexplained that the attacks recover, under the same scoring (``AuditReport.per_sample_gain``;
    for the fold attack, ``audit.flat_gain`` against fold(x)).

    ``threads`` > 1 splits the samples into that many parts audited in threads: every score is a
    sample's own (the audit's per-sample max depends on nothing else), and the attacks' numpy, scipy
    and scikit-image work runs mostly without the GIL (1.7x on 2 cores)."""
    run = state.get("audit", _audit_runner()) if state.get("method") != "fold" else None
    if run is not None:
        import torch

        def one(part: slice) -> np.ndarray:
            # per-sample scores only: the re-identification rate (a gallery of 100 x 100 SSIMs per attack,
            # half the audit's time on small images) is not part of the gate
            report = run(torch.from_numpy(x[part]), torch.from_numpy(v[part]), reid_gallery=0)
            scores = np.asarray(report.per_sample_max, dtype=np.float64).reshape(-1)
            if not with_gain:
                return scores[None]
            return np.stack([scores, np.asarray(report.per_sample_gain, dtype=np.float64).reshape(-1)])

        try:
            n = max(1, min(int(threads), len(x) // MIN_PART))
            if n == 1:
                out = one(slice(None))
            else:
                bounds = np.linspace(0, len(x), n + 1).round().astype(int)
                with ThreadPoolExecutor(max_workers=n, thread_name_prefix="veil-gate") as pool:
                    out = np.concatenate(list(pool.map(one, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])])),
                                         axis=1)
            if out.shape[1] != len(x) or not np.all(np.isfinite(out)):
                raise ValueError(f"per_sample_max has shape {out.shape[1:]} for {len(x)} samples")
            state["method"] = "audit"
            state["audit"] = run
            return (out[0], out[1]) if with_gain else out[0]
        except Exception as e:  # noqa: BLE001 - an audit problem must not hide the fold check
            log.warning("veil_transforms.audit.run failed (%s: %s); using the fold attack", type(e).__name__, e)
    state["method"] = "fold"
    scores = fold_attack_ssim(x, v)
    if not with_gain:
        return scores
    from veil_transforms.audit import flat_gain, flat_ssim

    return scores, flat_gain(scores, flat_ssim(x, ("fold(x)",)))


AVERAGE_CHUNK = 256  # images per batch of the averaging pass


def _samples_from(shards_dir: Path, entries: list[dict], start: int):
    """The shards' samples in shard order, from global position ``start`` on."""
    for s in entries:
        if start >= s["count"]:
            start -= s["count"]
            continue
        for i, smp in enumerate(shards.read_tar_samples(shards_dir / s["name"])):
            if i >= start:
                yield smp
        start = 0


def average_gate(shards_dir: Path, manifest: dict, items: dict, source, channels: int, state: dict,
                 pb=None, threads: int = 1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The averaging attack on every image veiled ``copies`` times: (each image's opaque key of copy 0,
    the strongest attack's SSIM on the mean of its veils, its gain over a flat image). The copies are stored copy by copy, so
    image i's veils sit at i, i + n, i + 2n, ... (n = samples per copy), as a third party sees them:
    one reader per copy, in step."""
    from veil_transforms.audit import average_copies

    k, total = manifest.get("copies", 1), manifest["num_veiled"]
    n = total // k
    if n * k != total:
        raise shards.VerifyError(f"{total} samples do not split into {k} copies")
    readers = [_samples_from(shards_dir, manifest["shards"], c * n) for c in range(k)]
    keys: list[str] = []
    scores, gains = [], []
    for lo in range(0, n, AVERAGE_CHUNK):
        group = [[next(r) for _ in range(min(AVERAGE_CHUNK, n - lo))] for r in readers]  # [copy][image]
        xs, vs = [], []
        for j in range(len(group[0])):
            owned = [items.get(group[c][j]["__key__"]) for c in range(k)]
            if any(o is None or o.copy != c or o.item.rel != owned[0].item.rel for c, o in enumerate(owned)):
                raise shards.VerifyError(
                    f"samples {lo + j} + i x {n} are not the {k} copies of one image: these shards are not in "
                    "veil-shard's copy-by-copy order, so the averaging attack cannot be run")
            keys.append(group[0][j]["__key__"])
            xs.append(_original(source, owned[0].item, channels))
            vs.append([shards.decode_image(group[c][j]["png"], channels=channels) for c in range(k)])
        avg = average_copies(np.stack(vs, axis=1))
        a, g = attack_ssim(np.stack(xs), avg, state, threads, with_gain=True)
        scores.append(a)
        gains.append(g)
        if pb is not None:
            pb.update(len(xs))
    return keys, *((np.concatenate(scores), np.concatenate(gains)) if scores else (np.zeros(0), np.zeros(0)))


# -- helpers ----------------------------------------------------------------------
LOCK = ".lock"  # .DEST.partial.lock beside the staging folder: one export at a time per DEST
RECORDS = ".gate"  # in the staging folder: each staged shard's keys, labels and gate scores


def _hold_staging(staging: Path, dest: Path) -> int:
    """An exclusive hold on DEST's staging (fcntl on a file beside the folder, never inside it: the
    folder becomes DEST; released when the process ends), or ShardError."""
    import fcntl

    fd = os.open(_lock_path(staging), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise shards.ShardError(f"another veil-export is writing {dest} (its work is in {staging}); "
                                "wait for it to end") from None
    except OSError as e:
        os.close(fd)
        raise shards.ShardError(f"cannot lock {_lock_path(staging)} ({e.strerror or e}): veil-export needs a "
                                "file system with flock for DEST's parent") from None
    return fd


def _lock_path(staging: Path) -> Path:
    return staging.parent / f"{staging.name}{LOCK}"


def _inputs_id(shards_dir: Path, manifest: dict, source) -> str:
    """What staged work depends on: the shards (their manifest, with each shard's sha256), the
    originals' listing and the library (its attacks). Another value: the staged work is discarded."""
    h = hashlib.sha256((shards_dir / shards.MANIFEST).read_bytes())
    h.update(repr((source.listing_sha256() if source is not None else None, manifest.get("key_fingerprint"),
                   shards.library_version(), source.classes if source is not None else None)).encode())
    return h.hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _resume_records(staging: Path, inputs: str) -> tuple[Path, bool]:
    """The staging folder's records folder, and whether it holds work of these inputs (else emptied)."""
    records = staging / RECORDS
    if (_read_json(records / "inputs.json") or {}).get("inputs") == inputs:
        return records, True
    for f in staging.iterdir():
        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    records.mkdir()
    shards.atomic_write_json(records / "inputs.json", {"inputs": inputs})
    return records, False


def merged_method(a: str | None, b: str | None) -> str | None:
    """The gate's attack over two parts of an export: "fold" if either fell back to it, else the one
    known (an empty shard records none)."""
    return "fold" if "fold" in (a, b) else a or b


def _check_source_tag(shard: dict, key: bytes, x: np.ndarray, sample_keys: list[bytes]) -> None:
    """The originals ``x`` of ``shard`` must be the images veil-shard veiled (its recorded content tag)."""
    if shards.source_tag(key, x, sample_keys) != shard["source_tag"]:
        raise shards.ShardError(f"originals of {shard['name']} are not the images veil-shard veiled "
                                f"({shards.SOURCE_TAG_DIFFERS})")


def _staged_record(records: Path, staging: Path, name: str) -> dict | None:
    """A staged shard's record, if the shard is there intact (its sha256 as recorded)."""
    rec = _read_json(records / f"{name}.json")
    if not isinstance(rec, dict) or not (staging / name).is_file():
        return None
    try:
        if shards.file_sha256(staging / name) != rec["sha256"] or len(rec["keys"]) != len(rec["labels"]):
            return None
    except (OSError, KeyError, TypeError):
        return None
    return rec


def default_private_map(shards_dir: Path) -> Path:
    shards_dir = shards_dir.absolute()
    return shards_dir.parent / f"{shards_dir.name}.private-map.csv"


def _check_dest(dest: Path, shards_dir: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise shards.ShardError(f"DEST {dest} exists and is not an empty folder")
    if shards.is_inside(dest, shards_dir) or shards.is_inside(shards_dir, dest):
        raise shards.ShardError(f"DEST {dest} and SHARDS {shards_dir} must not contain each other")
    # DEST is assembled beside it (.DEST.partial) and renamed into place at the end: checked now, not
    # after the gate has run (a mount point cannot be replaced by a rename: EBUSY at the very end)
    if dest.is_dir() and _is_mount_point(dest):
        raise shards.ShardError(f"DEST {dest} is a mount point, which the finished export cannot be renamed onto "
                                f"(it is assembled beside DEST, then renamed): give a new folder inside it, "
                                f"e.g. {dest / 'export'}")
    why = unwritable_folder(dest.parent)
    if why:
        verb = "replace" if dest.exists() else "create"
        raise shards.ShardError(f"cannot {verb} DEST {dest}: its folder {dest.parent} must be writable (the export "
                                f"is assembled there, beside DEST, then renamed into place): {why}")


MAP_HEADER = ["opaque_key", "path", "label", "shard", "copy"]


def _staging(dest: Path) -> Path:
    """The hidden folder beside DEST where the export is assembled before it is renamed to DEST."""
    return dest.parent / f".{dest.name}.partial"


def _private_map_path(arg, shards_dir: Path, dest: Path, gate: bool = True, *, key_file: Path | None = None,
                      originals: str | None = None) -> Path:
    """Where the map goes, checked before any work: it is written before DEST appears (all or nothing).
    It may replace an earlier export's map, never another file (the key, the manifest, an original)."""
    pm = Path(arg).absolute() if arg else default_private_map(shards_dir)
    # DEST is assembled in a hidden folder beside it, then renamed: a map in there would land in DEST
    for d in (dest, *dest.parent.glob(f".{dest.name}.partial*"), _staging(dest)):
        if shards.is_inside(pm, d) or shards.is_inside(pm.parent, d):
            where = "" if d == dest else f" (its folder {pm.parent} is {d}, which becomes DEST)"
            raise shards.ShardError(f"the private map {pm} must not be inside DEST {dest}{where}: DEST goes to "
                                    "the third party")
    if gate:
        if pm.is_dir():
            raise shards.ShardError(f"--private-map {pm} is a folder: give a file name (e.g. {pm / 'private-map.csv'})")
        for what, where in (("SHARDS", shards_dir), ("--originals", Path(originals).absolute() if originals else None)):
            if where is not None and shards.is_inside(pm, where):
                raise shards.ShardError(f"the private map {pm} must not be inside {what} {where}")
        if key_file is not None and pm.exists() and pm.resolve() == key_file.resolve():
            raise shards.ShardError(f"--private-map {pm} is the key file: writing the map there would destroy the key")
        if pm.exists() and not _is_private_map(pm):
            raise shards.ShardError(f"--private-map {pm} exists and is not a private map of an earlier export: "
                                    "give a new file name (an existing map is replaced; any other file is not)")
        why = unwritable_folder(pm.parent)
        if why:
            raise shards.ShardError(f"cannot write the private map {pm}: {why}")
    return pm


def _originals(args, manifest: dict, shards_dir: Path):
    """(key, {opaque key: shards.Owned(item, copy, copy key)}, Source) for the gate, checked against the manifest."""
    key_file = Path(args.key_file) if args.key_file else shards.default_key_file(shards_dir)
    if not key_file.is_file():
        raise shards.ShardError(f"key file not found: {key_file} (pass --key-file, the one veil-shard used)")
    try:
        key = _keys.read_key_file(key_file)
    except (OSError, ValueError) as e:
        raise shards.ShardError(f"key file {key_file}: {e}") from None
    if _keys.key_fingerprint(key) != manifest.get("key_fingerprint"):
        raise shards.ShardError(f"key file {key_file} is not the key these shards were made with")
    labels = args.labels or (manifest["source"].get("labels") if manifest["source"].get("kind") == "labels-csv" else None)
    source = shards.open_source(args.originals, labels)
    same = source.listing_sha256() == manifest["source"]["listing_sha256"]
    untagged = sum(1 for s in manifest["shards"] if s.get("source_tag") is None)
    if not same and untagged:  # no content tag: the listing is all that says these are the images veiled
        raise shards.ShardError(
            f"--originals {args.originals} does not list the same files and labels as the SRC veil-shard used, "
            f"and {untagged} shard(s) have no content tag (made by an earlier veil-shard) by which their samples "
            "could be checked against their originals: give the SRC as it was (move the files added since out "
            "of it), or tag the shards first: rerun veil-shard with --recheck-source on the SRC as it was")
    if not same:
        # files added to SRC since are not in the shards, and do not matter here; each veiled sample's
        # original is still looked for (removed: refused), its label compared and its pixels tagged
        print(f"{PROG}: warning: --originals {args.originals} does not list the same files and labels as the SRC "
              "veil-shard used (images added, removed or renamed since): exporting the shards as they are, each "
              "sample checked against its original; images added since are not in them (veil-shard them into "
              "a new OUT)", file=sys.stderr, flush=True)
    return key, shards.opaque_keys(key, manifest.get("copies", 1), source.items), source, same


def _class(classes: list | None, label: int):
    """A label's class name (ImageFolder, a labels file of names), or its number (``classes`` None)."""
    return classes[label] if classes and 0 <= label < len(classes) else label


def _original(source, item, channels: int) -> np.ndarray:
    try:
        return shards.decode_image(source.read_bytes(item), channels=channels)
    except Exception as e:  # noqa: BLE001
        msg = shards._ADDR.sub("", str(e).splitlines()[0] if str(e) else "").strip()  # no "<_io.BytesIO ... at 0x..>"
        raise shards.ShardError(f"original {item.rel} can no longer be read ({type(e).__name__}: {msg})") from None


def _is_private_map(path: Path) -> bool:
    """Whether a file starts with a private map's header (an earlier export's map may be replaced)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None) == MAP_HEADER
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def _foreign_map_rows(path: Path, items) -> int:
    """How many rows of an earlier private map name a key that is not one of ``items`` (every row is
    read: a map of another source under the same key shares its first rows with this one's)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            next(rows, None)
            return sum(1 for row in rows if row and row[0] not in items)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise shards.ShardError(f"--private-map {path} exists and cannot be read to the end ({e}): "
                                "give a new file name") from None


def _shard_keys(shards_dir: Path, manifest: dict) -> set[str]:
    """The opaque keys in the shards the manifest lists (their tar headers: the images are not read)."""
    out = set()
    for s in manifest["shards"]:
        try:
            with tarfile.open(shards_dir / s["name"], "r:") as tf:
                out.update(m.name.split(".", 1)[0] for m in tf)
        except (OSError, tarfile.TarError) as e:  # as the check of every shard against the manifest says it
            raise shards.VerifyError(f"shard {s['name']} is missing or damaged ({e})") from None
    return out


def _write_private_map(path: Path, rows: list[tuple[str, str, int, str, int]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MAP_HEADER)
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    shards.atomic_write_bytes(path, buf.getvalue().encode("utf-8"), mode=0o600)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)


def _write_shard(path: Path, samples: list[tuple[str, np.ndarray, int]]) -> tuple[str, int]:
    body = b"".join(shards.tar_sample(k, y, a) for k, a, y in samples)
    with open(path, "wb") as f:
        f.write(body + shards.tar_end(len(body)))
        f.flush()
        os.fsync(f.fileno())
    return shards.file_sha256(path), path.stat().st_size


def attack_fails(a: float, gain: float | None, max_attack_ssim: float, max_attack_gain: float) -> bool:
    """The gate's attack rule for one sample: over the absolute bar, and recovering more than
    ``max_attack_gain`` of what a flat image of it leaves unexplained (unknown: a record of an older
    export, judged by the bar alone)."""
    return a > max_attack_ssim + EPS and (gain is None or gain > max_attack_gain + EPS)


def refusal_reasons(ssims, attacks, gains, max_ssim: float, max_attack_ssim: float, max_attack_gain: float,
                    method) -> str:
    """How many samples break each bar of the gate, with the worst value and the flag that sets the bar."""
    parts = []
    v = np.asarray(ssims, dtype=np.float64)
    n = int(np.sum(v > max_ssim + EPS))
    parts.append(f"{n} exceed --max-ssim {max_ssim} (SSIM(x, x~), max {v.max():.3f})" if len(v)
                 else f"0 exceed --max-ssim {max_ssim}")
    fails = [attack_fails(a, g, max_attack_ssim, max_attack_gain) for a, g in zip(attacks, gains)]
    over = [g for g, bad in zip(gains, fails) if bad and g is not None]
    worst = f", max {max(attacks):.3f}" + (f", gain up to {max(over):+.3f}" if over else "") if attacks else ""
    parts.append(f"{sum(fails)} exceed --max-attack-ssim {max_attack_ssim} by more than --max-attack-gain "
                 f"{max_attack_gain} over a flat image ({method} attack SSIM{worst})")
    return ", ".join(parts)


def _stats(a: list[float]) -> dict:
    if not a:
        return {"mean": None, "max": None}
    v = np.asarray(a, dtype=np.float64)
    return {"mean": round(float(v.mean()), 6), "max": round(float(v.max()), 6)}


# -- the export -------------------------------------------------------------------
def export(args) -> int:
    from veil_transforms.metrics import ssim
    from veil_transforms.progress import bar

    t0 = time.perf_counter()
    shards_dir = Path(args.shards).absolute()
    dest = Path(args.dest).absolute()
    if not shards_dir.is_dir():
        raise shards.ShardError(f"SHARDS folder not found: {shards_dir}")
    for name, v in (("--max-ssim", args.max_ssim), ("--max-attack-ssim", args.max_attack_ssim)):
        if not (np.isfinite(v) and -1.0 <= v <= 1.0):
            raise shards.ShardError(f"{name} must lie in [-1, 1], got {v}")
    if not (np.isfinite(args.max_attack_gain) and -2.0 <= args.max_attack_gain <= 2.0):
        raise shards.ShardError(f"--max-attack-gain must lie in [-2, 2], got {args.max_attack_gain}")
    manifest = shards.read_manifest(shards_dir)
    _check_dest(dest, shards_dir)
    gate = args.originals is not None
    key_file = Path(args.key_file).absolute() if args.key_file else shards.default_key_file(shards_dir)
    pm_path = _private_map_path(args.private_map, shards_dir, dest, gate, key_file=key_file, originals=args.originals)
    items = source = None
    if gate:
        key, items, source, same = _originals(args, manifest, shards_dir)
        # an earlier map is replaced only if every row's key is these shards': the listing's keys when it is
        # the one veil-shard used, else the keys in the shards (a grown SRC lists another OUT's keys too)
        foreign = _foreign_map_rows(pm_path, items if same else _shard_keys(shards_dir, manifest)) \
            if pm_path.exists() else 0
        if foreign:  # an earlier map, but of other shards or another key: replacing it would lose its rows
            raise shards.ShardError(f"--private-map {pm_path} is the map of another export ({foreign} of its keys "
                                    "are not these shards'): pass --private-map with a new file name")
    paper_without_gate = not gate and manifest["veil"].get("mode", "paper") == "paper"  # (a gate would measure it)
    if paper_without_gate and not args.force:
        raise shards.VerifyError(
            "refused: no --originals, so no privacy gate, and these shards hold the paper's veil (veil-shard "
            "--mode paper), which a key-free fold attack reads back (|2 x~ - 1|; README \"What it protects\"); "
            "veil again with --mode hardened, give --originals to run the gate, or pass --force to export them "
            "anyway (recorded in the receipt)")
    manifest = shards.verify(shards_dir)  # raises VerifyError
    channels = int(manifest["source"]["sample_shape"][0])

    staging = _staging(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{dest.name}.partial-*"):  # an earlier version's, per process
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(exist_ok=True)
    except OSError as e:
        raise shards.ShardError(f"cannot create DEST {dest}: {e.strerror or e}: {e.filename}") from None
    hold = _hold_staging(staging, dest)
    try:
        records, resumed = _resume_records(staging, _inputs_id(shards_dir, manifest, source))
        state: dict = {}
        ssims: list[float] = []
        attacks: list[float] = []
        gains: list[float | None] = []  # each sample's attack gain over a flat image (None: an older record)
        excused = 0  # over --max-attack-ssim, within --max-attack-gain of a flat image
        offenders: list[tuple[str, float, float]] = []
        private_rows: list[tuple[str, str, int, str]] = []
        out_shards = []
        reused = 0
        seen: dict[str, str] = {}  # a veil's pixel hash -> the first key with it
        twins: list[tuple[str, str]] = []  # (key, the earlier key with the same pixels)

        def note_twins(keys: list[str], digests: list[str]) -> None:
            for k, d in zip(keys, digests):
                if d in seen:
                    twins.append((k, seen[d]))
                else:
                    seen[d] = k

        def account(name: str, keys: list[str], labels: list[int], s_x, s_a, s_g) -> None:
            nonlocal excused
            for i, (k, y) in enumerate(zip(keys, labels)):
                if gate:
                    a1, a2 = float(s_x[i]), float(s_a[i])
                    g = None if s_g is None or s_g[i] is None else float(s_g[i])
                    ssims.append(a1)
                    attacks.append(a2)
                    gains.append(g)
                    bad_attack = attack_fails(a2, g, args.max_attack_ssim, args.max_attack_gain)
                    excused += a2 > args.max_attack_ssim + EPS and not bad_attack
                    if a1 > args.max_ssim + EPS or bad_attack:
                        offenders.append((k, a1, a2))
                    private_rows.append((k, items[k].item.rel, y, name, items[k].copy))

        with bar(total=manifest["num_veiled"], desc="exporting", disable=args.quiet) as pb:
            for s in manifest["shards"]:
                rec = _staged_record(records, staging, s["name"]) if resumed else None
                if rec is not None and gate and rec["keys"] and s.get("source_tag") is not None:
                    # the originals may have changed under the same names since: their content tag again
                    # (decoding and hashing only, far below the gate's cost)
                    if any(k not in items for k in rec["keys"]):
                        rec = None
                    else:
                        x = np.stack([_original(source, items[k].item, channels) for k in rec["keys"]])
                        _check_source_tag(s, key, x, [items[k].key for k in rec["keys"]])
                if rec is not None:  # gated and written by an earlier run that was stopped or refused
                    state["method"] = merged_method(state.get("method"), rec.get("method"))
                    account(s["name"], rec["keys"], rec["labels"], rec.get("ssim"), rec.get("attack"), rec.get("gain"))
                    note_twins(rec["keys"], rec.get("digests") or [])
                    out_shards.append({"name": s["name"], "count": len(rec["keys"]), "sha256": rec["sha256"],
                                       "bytes": rec["bytes"]})
                    reused += 1
                    pb.update(len(rec["keys"]))
                    continue
                samples = []
                for smp in shards.read_tar_samples(shards_dir / s["name"]):
                    k = smp["__key__"]
                    a = shards.decode_image(smp["png"], channels=channels)
                    samples.append((k, a, int(smp["cls"].decode())))
                s_x = s_a = s_g = None
                if gate and samples:  # a shard can be empty: every image of its part of SRC was skipped
                    missing = [k for k, _, _ in samples if k not in items]
                    if missing:
                        raise shards.ShardError(f"{len(missing)} samples of {s['name']} have no original in "
                                                f"{args.originals} (e.g. {missing[0]}): removed or renamed since "
                                                "veil-shard ran? Put them back to gate these shards")
                    # by class name where both name their classes (a class added since renumbers, not relabels)
                    old, new = manifest["source"].get("classes"), source.classes
                    old, new = (old, new) if old and new else (None, None)
                    relabelled = [(items[k].item.rel, _class(old, y), _class(new, items[k].item.label))
                                  for k, _, y in samples]
                    relabelled = [r for r in relabelled if r[1] != r[2]]
                    if relabelled:
                        rel, was, now = relabelled[0]
                        raise shards.ShardError(f"{len(relabelled)} samples of {s['name']} have another label in "
                                                f"{args.originals} than in the shard (e.g. {rel}: {was!r} there, {now!r} "
                                                "now): labels changed since veil-shard ran; veil-shard into a new OUT")
                    x = np.stack([_original(source, items[k].item, channels) for k, _, _ in samples])
                    v = np.stack([a for _, a, _ in samples])
                    if x.shape != v.shape:
                        raise shards.ShardError(f"originals of {s['name']} have shape {x.shape[1:]}, veiled {v.shape[1:]}")
                    if s.get("source_tag") is None:
                        if not state.get("untagged_warned"):
                            state["untagged_warned"] = True
                            print(f"{PROG}: warning: {s['name']} has no source tag in the manifest (made before "
                                  "veil-shard recorded one): cannot check that --originals hold the images veiled",
                                  file=sys.stderr, flush=True)
                    else:
                        _check_source_tag(s, key, x, [items[k].key for k, _, _ in samples])
                    s_x = [float(a) for a in ssim(x, v)]
                    s_a, s_g = (a.tolist() for a in attack_ssim(x, v, state, args.threads, with_gain=True))
                keys, labels = [k for k, _, _ in samples], [y for _, _, y in samples]
                digests = [hashlib.sha256(a.tobytes()).hexdigest()[:16] for _, a, _ in samples]
                account(s["name"], keys, labels, s_x, s_a, s_g)
                note_twins(keys, digests)
                sha, size = _write_shard(staging / s["name"], samples)
                shards.atomic_write_json(records / f"{s['name']}.json", {  # opaque keys and scores: no names
                    "keys": keys, "labels": labels, "ssim": s_x, "attack": s_a, "gain": s_g, "method": state.get("method"),
                    "digests": digests,
                    "sha256": sha, "bytes": size})
                out_shards.append({"name": s["name"], "count": len(samples), "sha256": sha, "bytes": size})
                pb.update(len(samples))
        if twins:  # shown under --quiet too: the third party sees it
            print(f"{PROG}: warning: {len(twins)} veils are byte-identical to another (e.g. {twins[0][0]} = "
                  f"{twins[0][1]}): their originals are identical, and the third party can see which (the same key "
                  "and image give the same veil); deduplicate SRC and veil again if that matters",
                  file=sys.stderr, flush=True)
        if reused and not args.quiet:
            print(f"{PROG}: resumed: {reused} of {len(manifest['shards'])} shards were gated and staged by an "
                  f"earlier run ({staging})", file=sys.stderr, flush=True)
        copies = manifest.get("copies", 1)
        averaged: np.ndarray = np.zeros(0)
        if gate and copies > 1 and manifest["num_veiled"]:  # a third party can link an image's copies
            done = _read_json(records / "average.json") if resumed else None
            if done is not None:
                avg_keys, averaged = done["keys"], np.asarray(done["scores"], dtype=np.float64)
                avg_gain = done.get("gain") or [None] * len(avg_keys)
            else:
                with bar(total=manifest["num_veiled"] // copies, desc=f"gate: averaging {copies} copies",
                         disable=args.quiet) as pb:
                    avg_keys, averaged, avg_gain = average_gate(shards_dir, manifest, items, source, channels,
                                                                state, pb, args.threads)
                avg_gain = avg_gain.tolist()
                shards.atomic_write_json(records / "average.json", {"keys": avg_keys, "scores": averaged.tolist(),
                                                                    "gain": avg_gain})
            fails = [attack_fails(float(a), g, args.max_attack_ssim, args.max_attack_gain)
                     for a, g in zip(averaged, avg_gain)]
            avg_offenders = [(k, float(a)) for k, a, o in zip(avg_keys, averaged, fails) if o]
            avg_excused = int(np.sum(averaged > args.max_attack_ssim + EPS)) - len(avg_offenders)
        else:
            avg_offenders, avg_excused = [], 0
        if (offenders or avg_offenders) and not args.force:
            reasons = refusal_reasons(ssims, attacks, gains, args.max_ssim, args.max_attack_ssim,
                                      args.max_attack_gain, state.get("method"))
            lines = [f"  {k}  ssim={a:.4f}  attack_ssim={b:.4f}" for k, a, b in offenders[:50]]
            if len(offenders) > 50:
                lines.append(f"  ... and {len(offenders) - 50} more")
            what = f"{len(offenders)} of {len(ssims)} samples fail the privacy gate"
            if avg_offenders:
                what += f", and {len(avg_offenders)} of {len(averaged)} images when their {copies} veils are averaged"
                reasons += (f"; {len(avg_offenders)} images exceed --max-attack-ssim {args.max_attack_ssim} by more "
                            f"than --max-attack-gain {args.max_attack_gain} over a flat image by the averaging "
                            f"attack (max {averaged.max():.3f})")
                lines += [f"  {k} (and its other copies)  average_of_{copies}_attack_ssim={a:.4f}" for k, a in avg_offenders[:50]]
                if len(avg_offenders) > 50:
                    lines.append(f"  ... and {len(avg_offenders) - 50} more")
            if manifest["veil"].get("mode", "paper") == "paper":  # no bar or step count fixes the paper's veil
                advice = ("these shards hold the paper's veil (veil-shard --mode paper), which a key-free fold attack "
                          "reads back: veil again with veil-shard --mode hardened (README \"Which mode to use\"); "
                          "--force exports anyway")
            else:
                advice = ("veil again with more --steps in veil-shard, or raise the flag named if its bar "
                          "is too strict; --force exports anyway")
            print(f"{PROG}: refused: {what}: {reasons}; nothing exported ({advice}; the gate's scores are "
                  f"kept in {staging}, so a rerun on the same shards does not compute them again):\n"
                  + "\n".join(lines), file=sys.stderr, flush=True)
            return 1
        receipt = {
            "format": "veil-export/1",
            "library_version": shards.library_version(),
            "created_unix": int(time.time()),
            "num_samples": sum(s["count"] for s in out_shards),
            # veils per image (veil-shard --copies), in copy-major order: keep an image's copies on one
            # side of a train/validation split
            "copies": manifest.get("copies", 1),
            "num_shards": len(out_shards),
            "num_classes": len(manifest["source"]["classes"]) if manifest["source"].get("classes") else None,
            "sample_shape": manifest["source"]["sample_shape"],
            "shards": out_shards,
            # the veil's settings without the model's file name (a name can say whose data this is)
            # (--threshold=-inf as the text "-inf": JSON has no infinity, and strict parsers refuse -Infinity)
            "veil": {k: str(v) if isinstance(v, float) and not np.isfinite(v) else v
                     for k, v in manifest["veil"].items() if k != "model"},
            "paper_mode_without_gate_forced": paper_without_gate,
            "key_fingerprint": manifest["key_fingerprint"],
            "gate": {
                "run": gate,
                "max_ssim": args.max_ssim,
                "max_attack_ssim": args.max_attack_ssim,
                "max_attack_gain": args.max_attack_gain,
                "attack": state.get("method"),
                "ssim": _stats(ssims),
                "attack_ssim": _stats(attacks),
                # per sample, the share of what a flat image leaves unexplained that the attacks recover
                "attack_gain": _stats([g for g in gains if g is not None]),
                "over_threshold": len(offenders),
                "over_attack_ssim_within_gain": int(excused),
                # the averaging attack on each image's copies (veil-shard --copies K > 1): one score per image
                "average_of_copies": {"images": len(averaged), "attack_ssim": _stats(averaged.tolist()),
                                      "over_threshold": len(avg_offenders),
                                      "over_attack_ssim_within_gain": int(avg_excused)} if len(averaged) else None,
                "forced": bool(args.force and (offenders or avg_offenders)),
            },
        }
        shards.atomic_write_json(staging / shards.RECEIPT, receipt)
        shards.fsync_dir(staging)
        if gate:  # before DEST appears: an export without its map must not exist
            try:
                _write_private_map(pm_path, private_rows)
            except OSError as e:
                raise shards.ShardError(f"cannot write the private map {pm_path}: {e.strerror or e}; "
                                        "nothing exported") from None
        shutil.rmtree(records)  # not for the third party (opaque keys and scores only, but no business of theirs)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(staging, dest)
        shards.fsync_dir(dest.parent)
        with contextlib.suppress(OSError):
            os.unlink(_lock_path(staging))  # done (still held: a second export waiting on it is refused)
    finally:  # a stopped, failed or refused export keeps its staged shards and scores for a rerun
        os.close(hold)
    if not gate:
        print(f"{PROG}: warning: no --originals: privacy gate not run and no private map written",
              file=sys.stderr, flush=True)
    g = receipt["gate"]
    avg_txt = (f", averaging {copies} copies: attack SSIM max {g['average_of_copies']['attack_ssim']['max']}"
               if g["average_of_copies"] else "")
    gate_txt = (f"gate {g['attack']}: SSIM max {g['ssim']['max']}, attack SSIM max {g['attack_ssim']['max']}{avg_txt}"
                + (f", {g['over_threshold'] + (g['average_of_copies'] or {}).get('over_threshold', 0)} over threshold (forced)"
                   if g["forced"] else "")) if gate else "no gate"
    print(f"{PROG}: exported {receipt['num_samples']} samples in {receipt['num_shards']} shards to {dest} "
          f"({gate_txt}){f'; private map: {pm_path}' if gate else ''} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return 0


MOUNTINFO = "/proc/self/mountinfo"


def _is_mount_point(d: Path) -> bool:
    """os.path.ismount, and on Linux the mount table too: a bind mount of a folder of the same filesystem
    (a container's volume) has its parent's device, which ismount compares."""
    if os.path.ismount(d):
        return True
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.split() for line in f]
    except OSError:
        return False
    octal = re.compile(r"\\([0-7]{3})")  # the table writes a space in a path as \040
    return str(d.resolve()) in {octal.sub(lambda m: chr(int(m[1], 8)), f[4]) for f in fields if len(f) > 4}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    try:
        return export(args)
    except shards.ShardError as e:
        return fail(PROG, e, 2)
    except shards.VerifyError as e:
        return fail(PROG, e, 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing exported yet: rerun the same command to resume (the shards gated "
              "so far are kept beside DEST)", file=sys.stderr)
        return 130
    except OSError as e:  # reading or writing files (a full disk, permissions): bad input/IO, not a refusal
        if debug():
            raise
        full = disk_full(e)
        if full is not None:
            return fail(PROG, f"a disk written to is full ({full.strerror}{f', {full.filename}' if full.filename else ''}; "
                              "DEST is assembled in "
                              f"{_staging(Path(args.dest).absolute())}): free space and rerun the same command "
                              "(the shards gated so far are kept there)", 2)
        return fail(PROG, f"{type(e).__name__}: {e}", 2)
    except Exception as e:  # noqa: BLE001
        if debug():
            raise
        return fail(PROG, f"{type(e).__name__}: {e}", 1)


if __name__ == "__main__":
    sys.exit(main())
