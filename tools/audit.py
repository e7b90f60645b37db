"""veil-audit: attack veiled images and report how much of the originals the attacks recover.

    veil-audit --originals SRC --veiled SHARDS [--key-file KEY] [--model M] [--out report_dir]
    veil-audit --originals x.npy --veiled x_veiled.npy

SHARDS is a veil-shard output folder (``veil-NNNNNN.tar`` + ``manifest.json``)
or a .tar; SRC is the folder it was made from (ImageFolder tree, or a flat
folder with ``--labels``, by default the labels file veil-shard used). Samples are
matched through their opaque keys, which only the owner's key file can recompute
(default: ``<SHARDS>.key`` beside the shard folder, as veil-shard writes it; for
one .tar of it, its folder's). Alternatively both inputs
are ``.npy`` / ``.pt`` uint8 arrays ``[N, C, H, W]`` matched by index.

``--model`` (a model trained on the veiled data) adds the logit-matching
inversion attack; ``--learned-public DIR`` (public images, ImageFolder
layout, disjoint from the audited ones) adds the adaptive learned inverter,
which veils them with the settings recorded in the shards' manifest (its layer
included; in fp32 whatever the recorded precision).

A shard listed in SHARDS' manifest.json (or a veil-export DEST's receipt.json)
whose sha256 differs from the one recorded is bad input: the audit would not
be of the shards recorded.

Exit codes: 0 the audit passed, 1 it failed (an attack recovers too much),
2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

from ._common import debug, fail, int_at_least, setup_logging, unwritable_folder

PROG = "veil-audit"
ARRAY_EXTS = (".npy", ".pt", ".pth")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}


class InputError(Exception):
    """Bad input: reported as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" where the help does not already say the default and there is one (not None)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from veil_transforms import audit

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Privacy audit: run keyless and adaptive attacks on veiled images and score them by SSIM.",
        epilog="Exit codes: 0 passed, 1 failed (an attack recovers too much), 2 bad input.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--originals", required=True, help="source folder the shards were made from, or a .npy/.pt uint8 [N, C, H, W]")
    p.add_argument("--veiled", required=True, help="veil-shard output folder or .tar (each shard's sha256 checked against "
                   "its manifest.json or receipt.json), or a .npy/.pt uint8 [N, C, H, W]")
    p.add_argument("--key-file", default=None, help="the owner's key file (default: <VEILED>.key beside the shard folder, which veil-shard writes; for one .tar of it, the folder's)")
    p.add_argument("--labels", default=None, help="labels CSV, if SRC is a flat folder (default: the one veil-shard used, from the manifest)")
    p.add_argument("--model", default=None, help="a model trained on veiled data (TorchScript .pt, state dict with --arch, or .onnx): adds the inversion attack")
    p.add_argument("--arch", default=None, help="architecture of a state-dict --model (lenet5 or a torchvision name)")
    p.add_argument("--out", default=None, help="folder for report.md, report.json and worst.png")
    p.add_argument("--attacks", nargs="+", default=None, choices=list(audit.ATTACKS),
                   help="attacks to run (default: all cheap ones, plus learned/inversion when their inputs are given)")
    p.add_argument("--mean-threshold", type=float, default=audit.DEFAULT_THRESHOLDS[0], help="fail if any attack's mean SSIM reaches this; in [-1, 1)")
    p.add_argument("--max-threshold", type=float, default=audit.DEFAULT_THRESHOLDS[1], help="fail if any sample's SSIM reaches this; in [-1, 1)")
    p.add_argument("--limit", type=int, default=None, help="audit only the first N matched samples, sorted by key (default: all)")
    p.add_argument("--incomplete", action="store_true",
                   help="audit the finished shards of a veil-shard OUT that is not complete (stopped, or still "
                        "running); without it such an OUT is refused: its audit is not of what will be exported")
    p.add_argument("--learned-public", nargs="+", default=None, metavar="DIR",
                   help="public images (ImageFolder folders, or a .pt holding (images, labels)) for the learned inverter")
    p.add_argument("--learned-arch", default=None,
                   help="surrogate local model architecture for the learned inverter (lenet5 or a torchvision name; "
                        "default: F's, when the manifest records it (veil-shard --arch), else lenet5); shards "
                        "veiled at an inner layer (--layer) need F's own")
    p.add_argument("--learned-epochs", type=int_at_least(1), default=10, help="surrogate training epochs")
    p.add_argument("--unet-epochs", type=int_at_least(1), default=30, help="inverter training epochs")
    p.add_argument("--inversion-steps", type=int, default=audit.OPTIONS["inversion_steps"], help="Adam steps of the inversion attack")
    p.add_argument("--device", default="cpu", help="device for the learned and inversion attacks")
    p.add_argument("--worst", type=int, default=8, help="rows (worst samples) in worst.png")
    p.add_argument("--quiet", action="store_true", help="print only the verdict line")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


# -- inputs ---------------------------------------------------------------------------
def load_array(path: str) -> np.ndarray:
    """A .npy or .pt file holding uint8 (or [0, 1] float) images ``[N, C, H, W]``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {path}")
    try:
        if p.suffix == ".npy":
            a = np.load(p, allow_pickle=False)
        else:
            import torch

            a = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(a, (tuple, list)):
                a = a[0]
            if isinstance(a, dict):
                a = a.get("images", a.get("x"))
            a = a.numpy() if hasattr(a, "numpy") else np.asarray(a)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if a is None or a.ndim not in (3, 4):
        raise InputError(f"{path}: expected images [N, C, H, W], got shape {getattr(a, 'shape', None)}")
    return a[:, None] if a.ndim == 3 else a


def _why(e: BaseException) -> str:
    """``Type: cause`` of a decoding error in one line (torch is imported only when it is needed)."""
    from veil_transforms.model import describe_error

    return describe_error(e)


def check_out(out: str, inputs: dict[str, str] = {}) -> None:  # noqa: B006 - read only
    """Refuse, before any work, an --out that is a file, lies inside an input folder (the report's images
    of original faces would join the originals, or the shards; the next veil-shard or export would
    list them), or lies where it cannot be created or written."""
    from veil_transforms.shards import is_inside

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {out} is a file; it must be a folder (created if missing)")
    for flag, where in inputs.items():
        if where and Path(where).is_dir() and is_inside(p, where):
            raise InputError(f"--out {out} is inside {flag} {where}: the report (images of originals among them) "
                             f"would become part of {flag}; write it elsewhere")
    why = unwritable_folder(p)
    if why:
        raise InputError(f"--out {out}: cannot write there ({why})")


def model_error(args, e: BaseException) -> str:
    """One line for a --model that LocalModel.load refused (its ValueErrors are one line already,
    a state dict of another architecture naming its first mismatch)."""
    return f"--model {args.model}: {e if isinstance(e, ValueError) else _why(e)}"


def _decode(data: bytes, channels: int | None = None) -> np.ndarray:
    """Image bytes -> uint8 [C, H, W] (grey -> 1 channel, else RGB; or forced ``channels``), decoded as
    veil-shard decodes them (EXIF rotation, 16-bit scaling): else the originals' content tags differ."""
    from veil_transforms.shards import decode_image

    return decode_image(data, channels)


class _Veiled(dict):
    """``{opaque key: PNG bytes}``, read as uint8 [C, H, W]: a sample is decoded when it is audited, so
    ``--limit 100`` of a million samples decodes 100 of them (it decoded all, 1.2 KB held per 28x28)."""

    def __init__(self):
        super().__init__()
        self.where: dict[str, str] = {}  # key -> its shard's name, for messages

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return _decode(super().__getitem__(key))
        except Exception as e:  # noqa: BLE001 - any undecodable sample is bad input
            raise InputError(f"shard {self.where[key]}: sample {key} is not a readable image ({_why(e)})") from None


def read_shards(path: str, incomplete: bool = False) -> tuple[dict[str, np.ndarray], dict, dict[str, list[str]]]:
    """Veiled samples ``{opaque key: uint8 [C, H, W]}`` (decoded when read) of a shard folder or .tar,
    its manifest (or {}), and each shard's keys in shard order ``{shard file name: [key, ...]}``.

    With a manifest.json (veil-shard's OUT) or receipt.json (veil-export's DEST), only the shards it
    lists are read: a .tar beside them that it does not list (being written, or stray) was never
    checked against a sha256 and will not be exported. An OUT that is not complete is refused unless
    ``incomplete``."""
    p = Path(path)
    manifest, recorded = {}, {}  # recorded: each listed shard's sha256 (an audit of changed shards says so)
    lists = False  # whether the manifest / receipt lists its shards (a hand-made partial one may not)
    home = p if p.is_dir() else p.parent  # one .tar of an OUT: its folder's manifest (copies, content tags)
    # veil-shard's OUT has a manifest; veil-export's DEST a receipt (its copies, key fingerprint and veil
    # settings without the model's name; no content tags)
    meta = next((home / n for n in ("manifest.json", "receipt.json") if (home / n).is_file()), None)
    if meta is not None:
        from veil_transforms import shards

        try:
            manifest = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {meta}: {e}") from None
        lists = isinstance(manifest.get("shards"), list)
        listed = manifest.get("shards") if lists else []
        recorded = {s["name"]: s["sha256"] for s in listed
                    if isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("sha256"), str)}
        if meta.name == "manifest.json" and manifest.get("complete") is False:
            done, total = len(recorded), manifest.get("num_shards", "?")
            if not incomplete:
                raise InputError(f"{home} is not complete: {done} of {total} shards are finished (veil-shard stopped "
                                 "or still running), so this would audit part of what will be exported; rerun "
                                 "veil-shard to finish it, or pass --incomplete to audit the finished shards")
            print(f"{PROG}: warning: --incomplete: auditing the {done} finished shards of {total}",
                  file=sys.stderr, flush=True)
        if meta.name == "receipt.json":
            manifest = {k: manifest[k] for k in ("copies", "key_fingerprint", "veil") if k in manifest}
        try:  # what this tool reads of it: the rest may be a partial manifest of hand-made shards
            shards.check_copies(manifest.get("copies", 1))
        except shards.ShardError:
            raise InputError(f"{meta} is damaged: field 'copies' is not an integer from 1 to "
                             f"{shards.MAX_COPIES}") from None
    if p.is_dir():
        tars = sorted(p.glob("*.tar"))
        if not tars:
            raise InputError(f"no .tar shards in {path}")
    elif p.is_file() and p.suffix == ".tar":
        tars = [p]
    else:
        raise InputError(f"veiled shards not found: {path}")
    if lists:
        unlisted = [t for t in tars if t.name not in recorded]
        if p.is_file() and unlisted:
            raise InputError(f"{p.name} is not among the finished shards {meta} lists (being written, or not "
                             "veil-shard's): audit the folder, or a listed shard")
        if unlisted:
            print(f"{PROG}: note: skipping {len(unlisted)} .tar file(s) {meta.name} does not list (e.g. "
                  f"{unlisted[0].name}: a shard being written, or stray; never checked, never exported)",
                  file=sys.stderr, flush=True)
            tars = [t for t in tars if t.name in recorded]
            if not tars:
                raise InputError(f"no finished shards in {path}: {meta.name} lists none")
    out = _Veiled()
    order: dict[str, list[str]] = {}
    for t in tars:
        order[t.name] = []
        try:
            if t.name in recorded and shards.file_sha256(t) != recorded[t.name]:
                raise InputError(f"shard {t.name}: its sha256 differs from {meta.name} (changed or damaged since "
                                 f"it was written): this audit would not be of the shards recorded")
            with tarfile.open(t, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    if ext.lower() == "png":
                        order[t.name].append(key)
                        out.where[key] = t.name
                        dict.__setitem__(out, key, tf.extractfile(m).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InputError(f"cannot read shard {t.name}: {e}") from None
    if not out:
        raise InputError(f"no png samples in {path}")
    return out, manifest, order


def check_source_tags(manifest: dict, order: dict[str, list[str]], key: bytes, originals: dict[str, np.ndarray],
                      read_original, sample_keys: dict[str, bytes] | None = None) -> int:
    """Check that the originals are the images veil-shard veiled, by the content tag it recorded per
    shard (same file names with other pixels would otherwise be audited as if they were the source).
    ``originals``: decoded originals by opaque key; ``read_original(k)`` decodes one more (used when no
    shard is fully covered, e.g. under --limit); ``sample_keys``: each sample's copy key (default:
    ``key``, one copy). Returns the number of shards checked."""
    from veil_transforms import shards

    tagged = [s for s in manifest.get("shards", []) if s.get("source_tag") and order.get(s["name"])]
    if not tagged:
        if manifest.get("shards"):
            print(f"{PROG}: warning: the manifest has no source tags (shards made before veil-shard recorded "
                  "them): cannot check that --originals hold the images veiled", file=sys.stderr, flush=True)
        return 0
    covered = [s for s in tagged if all(k in originals for k in order[s["name"]])]
    if not covered:  # check the smallest shard at least
        covered = [min(tagged, key=lambda s: len(order[s["name"]]))]
    for s in covered:
        x = np.stack([originals[k] if k in originals else read_original(k) for k in order[s["name"]]])
        ks = [sample_keys.get(k, key) for k in order[s["name"]]] if sample_keys else None
        if shards.source_tag(key, x, ks) != s["source_tag"]:
            raise InputError(f"originals of {s['name']} are not the images veil-shard veiled "
                             f"({shards.SOURCE_TAG_DIFFERS})")
    return len(covered)


def list_originals(src: str, labels: str | None):
    """``([(relative path, item)], source)`` for every image in SRC, named as veil-shard names them.

    Uses :func:`veil_transforms.shards.open_source` when present (``item`` is its
    ``SourceItem``, ``source`` reads it); otherwise walks the folder (``item`` is
    the file path, ``source`` is None).
    """
    try:  # the shard writer's own listing, when available (handles every source kind it accepts)
        from veil_transforms import shards

        source = shards.open_source(src, labels)
    except ImportError:
        source = None
    except Exception as e:  # noqa: BLE001 - its errors are bad input
        raise InputError(str(e)) from None
    if source is not None:
        return [(it.rel, it) for it in source.items], source
    root = Path(src)
    if not root.is_dir():
        raise InputError(f"originals folder not found: {src}")
    items = [
        (f.relative_to(root).as_posix(), str(f))
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_EXTS and not any(s.startswith(".") for s in f.relative_to(root).parts)
    ]
    return items, None


def _arch_of(model: str | None) -> str | None:
    """F's architecture from the manifest's model name (``resnet18:f.pt`` for a state dict loaded with
    --arch, ``LeNet5`` for an in-memory LeNet-5; a TorchScript file's name says nothing), normalised."""
    if not model:
        return None
    name = (model.split(":", 1)[0] if ":" in model else model).lower()
    if name in ("lenet5", "lenet-5", "lenet"):
        return "lenet5"
    if ":" not in model:
        return None
    import torchvision  # (an ONNX file's own name may hold a colon: a prefix that names no architecture)

    return name if name in torchvision.models.list_models() else None


def default_key_file(veiled: str) -> Path:
    """Where veil-shard wrote the key of ``veiled``: ``<OUT>.key`` beside OUT, also for one shard of OUT
    (a ``.tar`` whose folder holds a manifest.json, or a receipt.json: a DEST, whose key is the owner's)."""
    v = Path(veiled.rstrip("/")).absolute()
    if v.is_file() and any((v.parent / n).is_file() for n in ("manifest.json", "receipt.json")):
        v = v.parent
    return v.parent / f"{v.name}.key"


def match(args) -> tuple[np.ndarray, np.ndarray, dict, list[list[int]]]:
    """(originals, veiled, manifest, groups): uint8 [N, C, H, W] arrays matched sample by sample, and for
    each image veiled more than once (veil-shard --copies) whose copies are all here, their indices."""
    o_arr = Path(args.originals).suffix.lower() in ARRAY_EXTS
    v_arr = Path(args.veiled).suffix.lower() in ARRAY_EXTS
    if o_arr != v_arr:
        raise InputError("--originals and --veiled must both be arrays (.npy/.pt) or a source folder and shards")
    if o_arr:
        x, v = load_array(args.originals), load_array(args.veiled)
        if x.shape != v.shape:
            raise InputError(f"--originals {x.shape} and --veiled {v.shape} differ in shape")
        if args.limit:
            x, v = x[: args.limit], v[: args.limit]
        return x, v, {}, []
    from veil_transforms import keys as _keys

    veiled, manifest, order = read_shards(args.veiled, incomplete=args.incomplete)
    key_file = Path(args.key_file) if args.key_file else default_key_file(args.veiled)
    try:
        key = _keys.read_key_file(key_file)
    except (OSError, ValueError) as e:
        raise InputError(f"key file: {e} (pass the owner's key with --key-file)") from None
    if manifest.get("key_fingerprint") and manifest["key_fingerprint"] != _keys.key_fingerprint(key):
        raise InputError(f"key file {key_file} is not the key these shards were made with (fingerprints differ)")
    src_meta = manifest.get("source") or {}  # a flat SRC: the labels file veil-shard used, as veil-export takes it
    labels = args.labels or (src_meta.get("labels") if src_meta.get("kind") == "labels-csv" else None)
    items, source = list_originals(args.originals, labels)
    pairs = []
    from veil_transforms.shards import copy_keys_of

    copy_key = {}  # opaque key -> the key of its copy (veil-shard --copies)
    copy_index = {}  # opaque key -> which copy it is
    for c, ck in enumerate(copy_keys_of(key, manifest.get("copies", 1))):
        for rel, ref in items:
            k = _keys.opaque_key(ck, rel)
            if k in veiled:
                pairs.append((k, rel, ref))
                copy_key[k], copy_index[k] = ck, c
    if not pairs:
        raise InputError(f"no sample of {args.veiled} matches an image of {args.originals} under this key")
    pairs.sort()
    unmatched = len(veiled) - len(pairs)
    by_key = {k: (rel, ref) for k, rel, ref in pairs}
    if args.limit:
        pairs = pairs[: args.limit]

    decoded: dict[str, np.ndarray] = {}

    def veil_of(k: str) -> np.ndarray:
        if k not in decoded:
            decoded[k] = veiled[k]
        return decoded[k]

    def read_original(k: str) -> np.ndarray:
        rel, ref = by_key[k]
        v = veil_of(k)
        where = Path(args.originals) / rel if Path(args.originals).is_dir() else f"{rel} in {args.originals}"
        try:
            data = source.read_bytes(ref) if source is not None else Path(ref).read_bytes()
            x = _decode(data, v.shape[0])
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read original {where} ({_why(e)})") from None
        if x.shape != v.shape:
            raise InputError(f"original {where} has shape {x.shape} but its veiled image {v.shape}")
        return x

    originals = {k: read_original(k) for k, _, _ in pairs}
    check_source_tags(manifest, order, key, originals,
                      lambda k: read_original(k) if k in by_key else _missing_original(k, args.originals), copy_key)
    xs = [originals[k] for k, _, _ in pairs]
    vs = [veil_of(k) for k, _, _ in pairs]
    if unmatched:
        print(f"{PROG}: note: {unmatched} veiled samples have no original in {args.originals}", file=sys.stderr)
    by_rel: dict[str, list[tuple[int, int]]] = {}
    for i, (k, rel, _) in enumerate(pairs):
        by_rel.setdefault(rel, []).append((copy_index[k], i))
    copies = manifest.get("copies", 1)
    groups = [[i for _, i in sorted(g)] for g in by_rel.values() if copies > 1 and len(g) == copies]
    return np.stack(xs), np.stack(vs), manifest, groups


def _missing_original(k: str, src: str):
    raise InputError(f"veiled sample {k} has no original in {src}: cannot check the shard's content tag")


def load_public(paths: list[str], channels: int, size: tuple[int, int]):
    """Public images and labels (ImageFolder trees, or .pt files holding (images, labels))."""
    import torch

    xs, ys = [], []
    offset = 0
    for path in paths:
        p = Path(path)
        if p.is_file() and p.suffix in (".pt", ".pth"):
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
                x, y = (obj["images"], obj["labels"]) if isinstance(obj, dict) else obj
            except Exception as e:  # noqa: BLE001
                raise InputError(f"--learned-public {path}: expected a .pt holding (images, labels): {e}") from None
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y).long() + offset)
            offset = int(torch.cat(ys).max()) + 1
            continue
        if not p.is_dir():
            raise InputError(f"--learned-public folder not found: {path}")
        classes = sorted(c.name for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        if not classes:
            raise InputError(f"--learned-public {path}: expected class sub-folders (ImageFolder layout)")
        for ci, c in enumerate(classes):
            for f in sorted((p / c).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS:
                    try:
                        a = _decode(f.read_bytes(), channels)
                    except Exception as e:  # noqa: BLE001 - any unreadable image is bad input
                        raise InputError(f"--learned-public image {f} cannot be read ({_why(e)})") from None
                    if a.shape[1:] != size:
                        raise InputError(f"--learned-public image {f} is {a.shape[1:]}, the audited images {size}")
                    xs.append(torch.from_numpy(a)[None])
                    ys.append(torch.tensor([ci + offset]))
        offset += len(classes)
    if not xs:
        raise InputError("--learned-public holds no images")
    x, y = torch.cat(xs), torch.cat(ys)
    if tuple(x.shape[1:]) != (channels, *size):
        raise InputError(f"--learned-public images are {tuple(x.shape[1:])}, the audited ones {(channels, *size)}")
    return x, y


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    try:
        import torch

        from veil_transforms import audit

        torch.set_flush_denormal(True)
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be >= 1, got {args.limit}")
        why = audit.device_problem(args.device)
        if why:
            raise InputError(f"--device {args.device}: {why}")
        if args.out:
            check_out(args.out, {"--originals": args.originals, "--veiled": args.veiled})
        kw = dict(attacks=args.attacks, thresholds=(args.mean_threshold, args.max_threshold), device=args.device,
                  worst=args.worst, inversion_steps=args.inversion_steps, progress=not args.quiet)
        try:  # before any work: settings audit.run would refuse
            audit.check_options(**{k: v for k, v in kw.items() if k != "attacks"})
        except (ValueError, TypeError) as e:
            raise InputError(e) from None
        x, v, manifest, groups = match(args)
        if args.model:
            from veil_transforms.model import LocalModel

            try:
                kw["model"] = LocalModel.load(args.model, arch=args.arch)
            except Exception as e:  # noqa: BLE001 - a model that cannot be loaded is bad input
                raise InputError(model_error(args, e)) from None
        if args.learned_public:
            from veil_transforms import nets
            from veil_transforms.model import LocalModel

            px, py = load_public(args.learned_public, x.shape[1], tuple(x.shape[2:]))
            n_cls = int(py.max()) + 1
            settings = manifest.get("veil", {})
            owner = _arch_of(settings.get("model"))
            arch = args.learned_arch or owner or "lenet5"
            # a layer is named within F's architecture: another one's node of that name is another depth
            if settings.get("layer") is not None and (_arch_of(arch + ":") != owner if owner else not args.learned_arch):
                raise InputError(f"the shards were veiled at layer {settings['layer']!r} of F"
                                 + (f" ({settings['model']})" if settings.get("model") else "")
                                 + ": the learned inverter's surrogate must be F's architecture"
                                 + (f", --learned-arch {owner}, not {arch}" if owner else ": give it with --learned-arch"))

            def make_model():
                if arch.lower() in ("lenet5", "lenet-5", "lenet"):
                    return nets.LeNet5(x.shape[1], n_cls)
                return nets.build(arch, {"fc.weight": torch.zeros(n_cls, 1)})

            veil_kwargs = {k: settings[k] for k in ("p", "alpha", "beta", "steps", "threshold", "lr", "mode", "layer")
                           if settings.get(k) is not None}
            if isinstance(veil_kwargs.get("threshold"), str):  # a receipt's "-inf" (JSON has no infinity)
                veil_kwargs["threshold"] = float(veil_kwargs["threshold"])
            if "layer" in veil_kwargs:  # the attacker veils as the owner did: at that layer of its surrogate
                try:
                    LocalModel(make_model(), layer=veil_kwargs["layer"])
                except ValueError as e:
                    raise InputError(f"the shards were veiled at F's layer {veil_kwargs['layer']!r}, and the learned "
                                     f"inverter's surrogate (--learned-arch {arch}) cannot be veiled there: {e}") from None
            if not settings:
                print(f"{PROG}: note: no manifest with veil settings; the learned inverter uses the library defaults",
                      file=sys.stderr)
            kw["learned"] = dict(public_images=px, public_labels=py, veil_kwargs=veil_kwargs, make_model=make_model,
                                 epochs=args.learned_epochs, unet_epochs=args.unet_epochs)
        try:
            report = audit.run(x, v, **kw)
            averaged = None
            if groups:  # a third party links an image's copies (by position) and averages them
                cheap = [a for a in (args.attacks or audit.CHEAP) if a in audit.CHEAP]
                avg_kw = {k: val for k, val in kw.items() if k not in ("model", "learned")}
                averaged = audit.run(x[[g[0] for g in groups]], audit.average_copies(np.stack([v[g] for g in groups], 1)),
                                     **{**avg_kw, "attacks": cheap}) if cheap else None
        except (ValueError, TypeError) as e:
            raise InputError(e) from None
    except InputError as e:
        if debug():
            raise
        return fail(PROG, e)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", 1)
    if args.out:
        try:
            report.save(args.out)
            if averaged is not None:
                averaged.save(Path(args.out) / "average_of_copies")
        except OSError as e:
            return fail(PROG, f"cannot write the report to {args.out}: {e}")
    if not args.quiet:
        print(report.summary())
        if averaged is not None:
            print(f"\nThe mean of each image's {len(groups[0])} veils (veil-shard --copies):\n{averaged.summary()}")
    passed = report.passed and (averaged is None or averaged.passed)
    verdict = "passed" if passed else "FAILED"
    where = f"; report in {args.out}" if args.out else ""
    avg_txt = (f"; averaging {len(groups[0])} copies: worst attack {averaged.worst_attack} mean SSIM "
               f"{averaged.max_mean_ssim:.3f}, max SSIM {averaged.max_ssim:.3f} over {averaged.n} images"
               f"{'' if averaged.passed else ' (FAILED)'}") if averaged is not None else ""
    print(f"{PROG}: audit {verdict}: worst attack {report.worst_attack} mean SSIM {report.max_mean_ssim:.3f}, "
          f"max SSIM {report.max_ssim:.3f} over {report.n} samples{avg_txt}{where}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
