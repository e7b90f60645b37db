"""veil-shard and the shard reader: kill -9 + resume, 2 processes, bad input, corrupt files, DataLoader workers."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from veil_transforms import keys, shards
from veil_transforms.nets import LeNet5
from veil_transforms.tools import shard as shard_cli
from veil_transforms.transform import VeilTransform

N_GOOD = 60
SHARD_SIZE = 4
COMMON = ["--steps", "3", "--shard-size", str(SHARD_SIZE), "--batch-size", "3", "--quiet", "--threads", "1"]


@pytest.fixture(autouse=True)
def _torch_state():
    """Run in-process veils like the subprocesses do (1 thread, no denormal flushing); restore after."""
    threads = torch.get_num_threads()
    torch.set_flush_denormal(False)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # conftest's session setting


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    torch.manual_seed(0)
    torch.jit.script(LeNet5(1, 3).eval()).save(str(root / "model.pt"))
    torch.jit.script(LeNet5(3, 3).eval()).save(str(root / "rgb_model.pt"))
    rng = np.random.default_rng(0)
    src = root / "src"
    for i in range(N_GOOD):
        d = src / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:03d}.png").write_bytes(_png(rng.integers(0, 256, (12, 12), dtype=np.uint8)))
    (src / "class0" / "img007b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    (src / "class1" / "img030b.png").write_bytes(_png(rng.integers(0, 256, (12, 12), dtype=np.uint8))[:60])  # truncated
    (src / "class2" / "img050b.png").write_bytes(_png(rng.integers(0, 256, (10, 10), dtype=np.uint8)))  # other size
    (src / "class2" / "notes.txt").write_text("not an image")
    key_file = root / "owner.key"
    keys.read_key_file(key_file, create=True)
    ref = root / "ref"
    base = [str(src), "--model", str(root / "model.pt"), "--key-file", str(key_file)]
    assert shard_cli.main([base[0], str(ref), *base[1:], *COMMON]) == 0
    return dict(root=root, src=src, model=root / "model.pt", key_file=key_file, ref=ref, base=base)


def _argv(data, out) -> list[str]:
    b = data["base"]
    return [b[0], str(out), *b[1:], *COMMON]


def test_main_in_process_leaves_the_callers_thread_count(data, tmp_path):
    """--threads set torch's thread count for the rest of a process that called main() (a notebook, a
    test): it is now restored when main() returns."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert shard_cli.main(_argv(data, tmp_path / "out")) == 0  # with --threads 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """opaque key -> (label, pixel bytes) over every shard in OUT's manifest."""
    got: dict[str, tuple[int, bytes]] = {}
    for s in shards.read_manifest(out)["shards"]:
        for smp in shards.read_tar_samples(out / s["name"]):
            assert smp["__key__"] not in got, "duplicate sample"
            got[smp["__key__"]] = (int(smp["cls"]), shards.decode_image(smp["png"]).tobytes())
    return got


def shas(out: Path) -> list[tuple[str, int, str, str]]:
    """Each shard's name, count, sha256 and source tag (all paths must record the same tag)."""
    return [(s["name"], s["count"], s["sha256"], s["source_tag"]) for s in shards.read_manifest(out)["shards"]]


# -- the reference run --------------------------------------------------------------
def test_manifest_keys_assignment_and_pixels(data):
    ref, key = data["ref"], keys.read_key_file(data["key_file"])
    m = shards.verify(ref)  # sha256 and counts match the files
    assert m["complete"] and m["num_shards"] == 16 and len(m["shards"]) == 16
    assert m["num_veiled"] == N_GOOD and m["num_skipped"] == 3
    assert m["key_fingerprint"] == keys.key_fingerprint(key)
    assert key.hex() not in (ref / "manifest.json").read_text()
    assert m["veil"]["steps"] == 3 and m["source"]["classes"] == ["class0", "class1", "class2"]
    assert m["source"]["sample_shape"] == [1, 12, 12] and m["source"]["num_samples"] == N_GOOD + 3
    source = shards.open_source(data["src"])
    assert m["order"] == "keyed"
    order = shards.keyed_order(key, source.items)
    assert order != source.items  # not the order of the file names (their alphabetical rank)
    for s in m["shards"]:  # shard i holds samples [4i, 4i + 4) of the keyed order, minus the skipped ones
        part = order[s["index"] * SHARD_SIZE : (s["index"] + 1) * SHARD_SIZE]
        skipped = {sk["path"] for sk in s["skipped"]}
        want = [(keys.opaque_key(key, it.rel), it.label) for it in part if it.rel not in skipped]
        got = [(smp["__key__"], int(smp["cls"])) for smp in shards.read_tar_samples(ref / s["name"])]
        assert got == want
        names = tarfile.open(ref / s["name"]).getnames()
        assert all(n.count(".") == 1 and not n.startswith("img") for n in names)
    # the pixels are the veil's output for the same batch
    first = shards.read_manifest(ref)["shards"][0]
    smp = list(shards.read_tar_samples(ref / first["name"]))[:3]
    rel = {keys.opaque_key(key, it.rel): it for it in source.items}
    x = torch.stack([torch.from_numpy(shards.decode_image(source.read_bytes(rel[s["__key__"]]))) for s in smp])
    veil = VeilTransform(str(data["model"]), key=key, steps=3, device="cpu")
    v = veil.veil_batch(x).numpy()
    assert np.array_equal(v, np.stack([shards.decode_image(s["png"]) for s in smp]))
    assert not np.array_equal(v, x.numpy())


def test_an_out_started_before_the_keyed_order_keeps_the_sorted_one(data, tmp_path):
    out = tmp_path / "out"
    argv = _argv(data, out)
    plan = shard_cli._prepare(shard_cli.build_parser().parse_args(argv), rank=0, world=1, local_rank=0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "veil-shards/2" and m["order"] == "keyed"  # an earlier veil-shard refuses /2
    del m["order"]  # as an earlier version wrote it, killed before its first shard
    m["format"] = "veil-shards/1"
    (out / "manifest.json").write_text(json.dumps(m))
    del plan
    assert shard_cli.main(argv) == 0
    key, source = keys.read_key_file(data["key_file"]), shards.open_source(data["src"])
    first = [smp["__key__"] for smp in shards.read_tar_samples(out / "veil-000000.tar")]
    skipped = {sk["path"] for sk in shards.read_manifest(out)["shards"][0]["skipped"]}
    assert first == [keys.opaque_key(key, it.rel) for it in source.items[:SHARD_SIZE] if it.rel not in skipped]
    m = shards.read_manifest(out)
    assert "order" not in m and m["format"] == "veil-shards/1"  # still an OUT in sorted order


def test_manifest_records_each_shards_source_tag(data):
    """A keyed tag of the normalized pixels veiled, in shard order (veil-export checks --originals with it)."""
    from veil_transforms import functional as F

    ref, key = data["ref"], keys.read_key_file(data["key_file"])
    source = shards.open_source(data["src"])
    rel = {keys.opaque_key(key, it.rel): it for it in source.items}
    m = shards.read_manifest(ref)
    for s in m["shards"]:
        x = torch.stack([torch.from_numpy(shards.decode_image(source.read_bytes(rel[smp["__key__"]])))
                         for smp in shards.read_tar_samples(ref / s["name"])])
        want = shards.source_tag_of_digests(key, [keys.sample_digest(key, a) for a in F.normalize(x).numpy()])
        assert s["source_tag"] == want == shards.source_tag(key, x.numpy())
    assert len({s["source_tag"] for s in m["shards"]}) == len(m["shards"])
    assert key.hex() not in json.dumps(m)


def test_corrupt_and_mismatched_files_are_skipped_and_listed(data):
    m = shards.read_manifest(data["ref"])
    by_path = {sk["path"]: sk["reason"] for sk in m["skipped"]}
    assert set(by_path) == {"class0/img007b.png", "class1/img030b.png", "class2/img050b.png"}
    assert by_path["class0/img007b.png"].startswith("corrupt")
    assert by_path["class1/img030b.png"].startswith("corrupt")
    assert by_path["class2/img050b.png"].startswith("size mismatch")
    assert all("0x" not in r for r in by_path.values())
    key = keys.read_key_file(data["key_file"])
    assert {sk["key"] for sk in m["skipped"]} == {keys.opaque_key(key, p) for p in by_path}


# -- kill -9 and resume ----------------------------------------------------------------
def _spawn(data, out: Path, throttle: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env[shards._THROTTLE_ENV] = str(throttle)
    return subprocess.Popen([sys.executable, "-m", "veil_transforms.tools.shard", *_argv(data, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _recorded(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return -1


def _tmps(out: Path) -> list[Path]:
    return list(out.glob(".veil-*.tar.tmp")) if out.exists() else []


def _kill_when(proc: subprocess.Popen, cond, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"sharder exited (rc {proc.returncode}) before the kill point: {err.decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.003)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_kill9_at_several_points_then_resume_equals_uninterrupted(data, tmp_path):
    out = tmp_path / "out"
    # 1. killed while the first shard is being written: nothing recorded, a .tmp left behind
    p = _spawn(data, out, throttle=0.05)
    _kill_when(p, lambda: _recorded(out) == 0 and _tmps(out))
    assert _recorded(out) == 0 and _tmps(out)
    # 2. killed right after a shard was recorded
    p = _spawn(data, out, throttle=0.02)
    _kill_when(p, lambda: _recorded(out) >= 1)
    after2 = _recorded(out)
    assert 1 <= after2 < 16
    # 3. killed mid-write, several shards later
    p = _spawn(data, out, throttle=0.02)
    _kill_when(p, lambda: _recorded(out) >= after2 + 3 and _tmps(out))
    assert after2 + 3 <= _recorded(out) < 16
    # finish (in-process); a kill never loses or duplicates samples
    assert shard_cli.main(_argv(data, out)) == 0
    assert not _tmps(out)
    shards.verify(out)
    assert snapshot(out) == snapshot(data["ref"])
    assert shas(out) == shas(data["ref"])  # byte-identical shards
    # a rerun of a finished job does nothing
    before = {f: f.stat().st_mtime_ns for f in out.glob("veil-*.tar")}
    assert shard_cli.main(_argv(data, out)) == 0
    assert {f: f.stat().st_mtime_ns for f in out.glob("veil-*.tar")} == before


def test_a_full_disk_is_said_and_the_rerun_loses_nothing(data, tmp_path, capsys, monkeypatch):
    """A full disk said "RuntimeError: shard writer failed: [Errno 28] No space left on device", naming no
    folder (a write's error has no file name; a helper's review at scale, on a 3 MB tmpfs)."""
    import errno

    out = tmp_path / "out"
    real, n = shards._OpenShard.finish, [0]

    def finish(self, *a, **k):
        n[0] += 1
        if n[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(shards._OpenShard, "finish", finish)
    assert shard_cli.main(_argv(data, out)) == 1
    err = _one_line_error(capsys)
    assert f"the disk of {out} is full (No space left on device): free space and rerun" in err, err
    monkeypatch.undo()
    assert shard_cli.main(_argv(data, out)) == 0
    shards.verify(out)
    assert shas(out) == shas(data["ref"]) and not _tmps(out)


def test_two_processes_equal_one(data, tmp_path):
    out = tmp_path / "out2"
    assert shard_cli.main([*_argv(data, out), "--nproc", "2"]) == 0
    shards.verify(out)
    assert snapshot(out) == snapshot(data["ref"])
    assert shas(out) == shas(data["ref"])
    assert not list(out.glob("*.json.*")) and not _tmps(out)


def test_torchrun_two_ranks_equal_one(data, tmp_path):
    out = tmp_path / "outT"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "veil_transforms.tools.shard", *_argv(data, out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16/16 shards" in r.stdout  # rank 0 reports after the barrier
    assert snapshot(out) == snapshot(data["ref"])
    assert shas(out) == shas(data["ref"])


def test_a_second_run_on_the_same_out_is_refused(data, tmp_path, capsys):
    """It deleted the first run's shards in progress, which then failed ('shard writer failed')."""
    out = tmp_path / "out"
    argv = _argv(data, out)
    first = shard_cli._prepare(shard_cli.build_parser().parse_args(argv), rank=0, world=1, local_rank=0)
    assert shard_cli.main(argv) == 2  # while the first holds OUT
    assert "another veil-shard is running on OUT" in _one_line_error(capsys)
    shards.run(first, batch_size=3, progress=False)  # releases OUT at its end
    assert shard_cli.main(argv) == 0 and shas(out) == shas(data["ref"])


def test_torchrun_launches_share_out_by_rank_and_a_refused_prepare_frees_it(data, tmp_path):
    out = tmp_path / "out"
    kw = dict(key_file=data["key_file"], shard_size=SHARD_SIZE, steps=3, device="cpu")
    rank0 = shards.prepare(data["src"], out, str(data["model"]), lock="shared", rank=0, **kw)
    rank1 = shards.prepare(data["src"], out, str(data["model"]), lock="shared", rank=1, **kw)  # same launch
    with pytest.raises(shards.ShardError, match="another veil-shard is running"):  # a second launch's rank 0
        shards.prepare(data["src"], out, str(data["model"]), lock="shared", rank=0, **kw)
    with pytest.raises(shards.ShardError, match="another veil-shard is running"):  # a one-process run
        shards.prepare(data["src"], out, str(data["model"]), **kw)
    rank0.lock.release()
    rank1.lock.release()
    with pytest.raises(shards.ShardError, match="different settings") as refused:
        shards.prepare(data["src"], out, str(data["model"]), **{**kw, "steps": 4})
    assert refused.value is not None  # the refusal (and its traceback) still alive: OUT must be free anyway
    assert shards.prepare(data["src"], out, str(data["model"]), **kw).lock.fds


def test_ranks_split_shards_and_resume_with_another_world_size(data, tmp_path):
    """Rank logic in-process: rank 1 of 3 first, then a 1-process rerun fills in the rest."""
    out = tmp_path / "out3"
    argv = _argv(data, out)
    plan = shard_cli._prepare(shard_cli.build_parser().parse_args(argv), rank=0, world=1, local_rank=0)
    s = shards.run(plan, rank=1, world_size=3, batch_size=3, progress=False)
    assert not s["complete"]
    assert sorted(x["index"] for x in shards.read_manifest(out)["shards"]) == list(range(1, 16, 3))
    assert shard_cli.main(argv) == 0
    assert shas(out) == shas(data["ref"])


# -- bad input: exit code 2 and one line ---------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("veil-shard: error: ") and "Traceback" not in err, err
    return err


def test_bad_inputs_exit_2_with_one_line(data, tmp_path, capsys):
    b = data["base"]
    src, model, kf = b[0], data["model"], data["key_file"]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {
        "OUT is a file": [src, str(tmp_path / "afile"), "--model", str(model), "--key-file", str(kf)],
        "OUT below a file": [src, str(tmp_path / "afile" / "sub"), "--model", str(model), "--key-file", str(kf)],
        "missing model": [src, str(tmp_path / "o1"), "--model", str(tmp_path / "nope.pt")],
        "empty SRC": [str(tmp_path / "empty"), str(tmp_path / "o2"), "--model", str(model)],
        "missing SRC": [str(tmp_path / "nowhere"), str(tmp_path / "o3"), "--model", str(model)],
        "channel mismatch": [src, str(tmp_path / "o4"), "--model", str(data["root"] / "rgb_model.pt")],
        "key inside OUT": [src, str(tmp_path / "o5"), "--model", str(model), "--key-file", str(tmp_path / "o5" / "k")],
        "bad p": [src, str(tmp_path / "o6"), "--model", str(model), "--p", "1.5"],
    }
    for what, argv in cases.items():
        assert shard_cli.main([*argv, *COMMON[:-3]]) == 2, what
        err = _one_line_error(capsys)
        if what == "channel mismatch":
            assert "does not accept" in err
    for flag, value in (("--shard-size", "0"), ("--nproc", "0")):
        assert shard_cli.main([src, str(tmp_path / f"o{flag}"), "--model", str(model), flag, value]) == 2, flag
        err = _one_line_error(capsys)
        assert f"{flag} must be" in err and f"got {value}" in err, err
    # nothing was created for inputs refused before OUT
    for o in ("o1", "o2", "o3", "o4", "o6", "o--shard-size", "o--nproc"):
        assert not (tmp_path / o).exists() and not (tmp_path / f"{o}.key").exists(), o
    # someone's shards without a manifest are never written over
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "veil-000000.tar").write_bytes(b"their data")
    assert shard_cli.main([src, str(tmp_path / "theirs"), "--model", str(model), "--key-file", str(kf), *COMMON]) == 2
    assert "holds shards but no manifest.json" in _one_line_error(capsys)
    assert (tmp_path / "theirs" / "veil-000000.tar").read_bytes() == b"their data"


def test_resume_with_other_params_or_key_is_refused(data, tmp_path, capsys):
    ref = data["ref"]
    (tmp_path / "retrained").mkdir()  # a retrained model saved under the same file name
    torch.manual_seed(1)
    retrained = tmp_path / "retrained" / data["model"].name
    torch.jit.script(LeNet5(1, 3).eval()).save(str(retrained))
    more = tmp_path / "more"  # SRC with one image added
    shutil.copytree(data["src"], more)
    shutil.copy(more / "class0" / "img000.png", more / "class0" / "img000_copy.png")
    before = (ref / "manifest.json").read_bytes()
    other_key = tmp_path / "other.key"
    keys.read_key_file(other_key, create=True)
    b = data["base"]
    for argv, needle in [
        ([b[0], str(ref), *b[1:], *COMMON, "--steps", "4"], "steps: 3 -> 4"),
        ([b[0], str(ref), *b[1:], *COMMON, "--p", "0.3"], "p: 0.5 -> 0.3"),
        ([b[0], str(ref), *b[1:], *COMMON, "--shard-size", "5"], "--shard-size"),
        ([b[0], str(ref), "--model", str(data["model"]), "--key-file", str(other_key), *COMMON], "the key"),
        ([b[0], str(ref), "--model", str(data["model"]), "--key-file", str(tmp_path / "gone.key"), *COMMON], "not found"),
        ([b[0], str(ref), "--model", str(data["root"] / "rgb_model.pt"), "--key-file", str(data["key_file"]), *COMMON],
         "does not accept"),
        ([b[0], str(ref), "--model", str(retrained), "--key-file", str(data["key_file"]), *COMMON], "the local model file"),
        ([str(more), str(ref), *b[1:], *COMMON], "the source listing (files added, removed or renamed, or labels changed; --recheck-source is for images edited"),
    ]:
        assert shard_cli.main(argv) == 2
        assert needle in _one_line_error(capsys)
    assert (ref / "manifest.json").read_bytes() == before
    assert not (tmp_path / "gone.key").exists()
    # the same weights under another file name resume
    shutil.copy(data["model"], tmp_path / "renamed.pt")
    assert shard_cli.main([b[0], str(ref), "--model", str(tmp_path / "renamed.pt"), "--key-file", str(data["key_file"]),
                           *COMMON]) == 0
    assert (ref / "manifest.json").read_bytes() == before


def test_all_images_corrupt(tmp_path, data, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(b"nope")
    assert shard_cli.main([str(tmp_path / "src"), str(tmp_path / "o"), "--model", str(data["model"])]) == 2
    assert "could be decoded" in _one_line_error(capsys)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        shard_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--shard-size" in out and "(default: 1000)" in out and "--nproc" in out


# -- other sources -------------------------------------------------------------------------
def test_imagefolder_listing(tmp_path, monkeypatch):
    """Nested folders give posix paths relative to the root, whatever its spelling; hidden files and folders
    and non-image files are left out; labels follow the sorted class folders."""
    for f in ["t/b/w.png", "t/a/x.png", "t/a/sub/y.JPG", "t/a/sub/deeper/z.png",
              "t/a/.h.png", "t/a/.hs/q.png", "t/.hid/v.png", "t/a/n.txt"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("L", (4, 4)).save(tmp_path / f, format="PNG")
    monkeypatch.chdir(tmp_path)
    want_rel = [("a/sub/deeper/z.png", 0), ("a/sub/y.JPG", 0), ("a/x.png", 0), ("b/w.png", 1)]
    for root in ["t", "./t/", "t//", str(tmp_path / "t")]:
        src = shards.open_source(root)
        assert src.classes == ["a", "b"] and src.root == str(tmp_path / "t")
        assert [(it.rel, it.label) for it in src.items] == want_rel
        assert [Path(it.path).resolve() for it in src.items] == [tmp_path / "t" / r for r, _ in want_rel]
        assert all(Path(it.path).is_file() for it in src.items)


def test_labels_csv_and_tar_sources(data, tmp_path):
    rng = np.random.default_rng(1)
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["filename,label"]
    tar_path = tmp_path / "src.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i in range(6):
            png = _png(rng.integers(0, 256, (12, 12), dtype=np.uint8))
            (flat / f"Person Name {i}.png").write_bytes(png)
            rows.append(f"Person Name {i}.png,{['cat', 'dog'][i % 2]}")
            for name, payload in ((f"s{i:02d}.png", png), (f"s{i:02d}.cls", str(i % 2).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    common = ["--model", str(data["model"]), "--key-file", str(data["key_file"]), "--steps", "1", "--quiet"]
    assert shard_cli.main([str(flat), str(tmp_path / "o1"), "--labels", str(tmp_path / "labels.csv"), *common]) == 0
    m = shards.read_manifest(tmp_path / "o1")
    assert m["source"]["kind"] == "labels-csv" and m["source"]["classes"] == ["cat", "dog"] and m["num_veiled"] == 6
    got = list(shards.load(tmp_path / "o1"))
    assert sorted(y for _, y in got) == [0, 0, 0, 1, 1, 1]
    assert b"Person" not in (tmp_path / "o1" / "veil-000000.tar").read_bytes()
    assert shard_cli.main([str(tar_path), str(tmp_path / "o2"), *common]) == 0
    m = shards.read_manifest(tmp_path / "o2")
    assert m["source"]["kind"] == "webdataset" and m["num_veiled"] == 6
    assert sorted(y for _, y in shards.load(tmp_path / "o2")) == [0, 0, 0, 1, 1, 1]


# -- the reader ------------------------------------------------------------------------------
def test_reader_in_dataloader_with_two_workers(data):
    ref = data["ref"]
    want = snapshot(ref)
    dl = torch.utils.data.DataLoader(shards.load(ref, with_keys=True), batch_size=7, num_workers=2)
    seen = {}
    for x, y, k in dl:
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 12, 12)
        for xi, yi, ki in zip(x, y, k):
            seen[ki] = (int(yi), xi.numpy().tobytes())
    assert seen == want
    # other url forms, shuffling, raw bytes
    names = [str(ref / s["name"]) for s in shards.read_manifest(ref)["shards"]]
    assert len(list(shards.load(names))) == N_GOOD
    assert len(list(shards.load(str(ref / "veil-{000000..000015}.tar")))) == N_GOOD
    assert len(list(shards.load(names[0]))) == shards.read_manifest(ref)["shards"][0]["count"]
    shuffled = [int(y) for _, y in shards.load(ref, shuffle=20, seed=1)]
    assert sorted(shuffled) == sorted(v[0] for v in want.values())
    img, y = next(iter(shards.load(ref, decode=False)))
    assert isinstance(img, bytes) and img[:4] == b"\x89PNG"


def test_reader_closes_its_shard_files(data):
    """webdataset leaves each shard file to the garbage collector (ResourceWarning: unclosed file)."""
    import gc
    import warnings

    ref = data["ref"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert len(list(shards.load(ref))) == N_GOOD  # read to the end
        for i, _ in enumerate(shards.load(ref, shuffle=5)):  # left early
            if i == 2:
                break
        next(iter(shards.load(ref, decode=False)))
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed[:3]


def test_reader_splits_by_node(data, monkeypatch):
    ref = data["ref"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        seen.append({k for _, _, k in shards.load(ref, split_by_node=True, with_keys=True)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == N_GOOD
    with pytest.raises(ValueError):
        list(shards.load(ref))  # multi-rank without split_by_node: refuse rather than duplicate


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF")])
def test_16_bit_images_are_scaled_to_8_bits_in_grey_and_colour_sets(mode, fmt):
    import io

    import PIL.Image

    a16 = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 8-bit value v stored as v * 257
    buf = io.BytesIO()
    PIL.Image.frombytes(mode, (16, 16), a16.astype(">u2" if mode.endswith("B") else "<u2").tobytes()).save(buf, format=fmt)
    want = (np.arange(16 * 16).reshape(16, 16)).astype(np.uint8)
    assert np.array_equal(shards.decode_image(buf.getvalue()), want[None])  # was all white for big-endian
    assert np.array_equal(shards.decode_image(buf.getvalue(), channels=3), np.stack([want] * 3))  # was {0, 255}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 17, 5), (1, 1, 1)])
def test_png_encoder_round_trip_and_no_metadata(shape):
    import struct

    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    png = shards.encode_png(a)
    assert np.array_equal(shards.decode_image(png, channels=shape[0]), a)
    chunks, pos = [], 8  # only IHDR, IDAT, IEND: nothing but pixels in the file
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        chunks.append(png[pos + 4 : pos + 8])
        pos += 12 + n
    assert chunks == [b"IHDR", b"IDAT", b"IEND"]
    with pytest.raises(ValueError, match="uint8"):
        shards.encode_png(a.astype(np.float32))


def test_tar_writer_is_byte_identical_to_webdatasets():
    """The shard writer builds tar members by hand (10x faster); the bytes must equal webdataset's TarWriter."""
    import webdataset as wds

    rng = np.random.default_rng(1)
    samples = [(f"{i:032x}", int(rng.integers(0, 10)), rng.integers(0, 256, (1, 5 + i, 7), dtype=np.uint8)) for i in range(9)]
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=shards.TAR_MTIME, user="veil", group="veil") as tw:
        for k, y, a in samples:
            tw.write({"__key__": k, "png": shards.encode_png(a), "cls": str(y).encode()})
    ours = b"".join(shards.tar_sample(k, y, a) for k, y, a in samples)
    ours += shards.tar_end(len(ours))
    assert ours == buf.getvalue()
    with pytest.raises(ValueError, match="too long"):
        shards.tar_member("x" * 100, b"")


def test_io_processes_write_the_same_bytes(data, tmp_path, monkeypatch):
    """Decoding, key hashing and PNG encoding in spawned I/O processes instead of threads: the
    very same shard files as the reference run (threads)."""
    import concurrent.futures

    pools, real = [], concurrent.futures.ProcessPoolExecutor
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", lambda *a, **k: pools.append(a) or real(*a, **k))
    out = tmp_path / "procs"
    assert shard_cli.main([*_argv(data, out), "--io-procs", "2"]) == 0
    assert pools == [(2,)]  # the processes did the work
    assert shas(out) == shas(data["ref"])


def test_io_process_work_needs_no_torch_and_hashes_like_the_library():
    """I/O processes start without torch (fast), and their numpy hashing gives the library's masks."""
    from veil_transforms import functional as F

    code = "import sys, veil_transforms.shards, veil_transforms.tools.shard; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    x = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lut = F.normalize(torch.arange(256, dtype=torch.uint8)).numpy()
    key = bytes(range(32))
    assert np.array_equal(keys.keyed_uniforms_np(key, lut[x.numpy()]), F.keyed_uniforms(key, F.normalize(x)).numpy())


def test_auto_io_procs(monkeypatch):
    """Processes only where they pay: one rank, 8+ usable CPUs, 20,000+ images; at most 8."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert shards.auto_io_procs(100_000) == 8
    assert shards.auto_io_procs(19_999) == 0
    assert shards.auto_io_procs(100_000, world_size=2) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert shards.auto_io_procs(100_000) == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert shards.auto_io_procs(100_000) == 0


def test_io_processes_do_not_rerun_the_calling_script(data, tmp_path):
    """Spawn reruns the parent's __main__ in each child; the I/O processes are started without it.
    An unguarded script (which would call write_shards again in each child: "BrokenProcessPool")
    works, runs once (one line in its log), and gives the bytes of a threads-only run."""
    script, log = tmp_path / "unguarded.py", tmp_path / "runs.log"
    script.write_text(
        "import os\n"
        f"open({str(log)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "from veil_transforms import shards\n"
        f"shards.write_shards({str(data['src'])!r}, {str(tmp_path / 'out')!r}, {str(data['model'])!r}, "
        f"key_file={str(data['key_file'])!r}, steps=3, shard_size={SHARD_SIZE}, device='cpu', io_procs=2, "
        "progress=False)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(log.read_text().splitlines()) == 1
    shards.verify(tmp_path / "out")
    assert shas(tmp_path / "out") == shas(data["ref"])


def test_write_shards_reports_its_timings(data, tmp_path):
    summary = shards.write_shards(data["src"], tmp_path / "out", str(data["model"]), key_file=data["key_file"],
                                  steps=1, device="cpu", shard_size=10, batch_size=8, progress=False)
    t = summary["timings"]
    assert summary["complete"] and t["prepare_s"] > 0 and 0 < t["veil_s"] < summary["seconds"]
    assert set(t) == {"prepare_s", "first_batch_decoded_s", "warm_up_s", "first_batch_s", "veil_s", "writer_wait_s",
                      "after_last_batch_s"}
    assert 0 < t["first_batch_decoded_s"] < t["first_batch_s"] and t["warm_up_s"] is None  # nothing to warm on the CPU


def test_the_veil_does_not_wait_on_each_shards_fsync(data, tmp_path, monkeypatch):
    """The writer's queue holds whole batches: the GPU thread hands over a batch's messages (its
    shards' begins, rows and ends) in one put and goes on veiling, unless the writer is several
    batches behind. Here each shard's end takes 50 ms (a slow disk's fsync) and a batch of 40 spans
    4 shards of 10: a queue of single messages blocked the veil for >= 2 of those ends per batch."""
    real_fsync, real_put, in_put = shards.fsync_dir, shards._Writer.put, []
    monkeypatch.setattr(shards, "fsync_dir", lambda d: (time.sleep(0.05), real_fsync(d)))

    def put(self, group):  # the veil's side of the queue: time blocked in put
        t = time.perf_counter()
        real_put(self, group)
        in_put.append(time.perf_counter() - t)

    monkeypatch.setattr(shards._Writer, "put", put)
    summary = shards.write_shards(data["src"], tmp_path / "out", str(data["model"]), key_file=data["key_file"],
                                  steps=1, device="cpu", shard_size=10, batch_size=40, progress=False)
    assert summary["complete"] and summary["shards_written"] >= 6
    assert -(-N_GOOD // 40) <= 5  # batches: the 4 the queue holds + the one the writer is on
    assert sum(in_put) < 0.04 and summary["timings"]["writer_wait_s"] < 0.04  # was 0.32 s
    shards.verify(tmp_path / "out")


def test_batch_times_are_taken_when_the_veil_returns(data, tmp_path, monkeypatch):
    """first_batch_s and steady_img_s come from the GPU thread's clock, not from when the main thread
    next looks (up to one batch's decoding and hashing later: here 4 x 10 ms of slow key hashing)."""
    plan = shards.prepare(data["src"], tmp_path / "out", str(data["model"]), key_file=data["key_file"],
                          steps=1, device="cpu", shard_size=10)
    real, returns = plan.veil.veil_batch, []

    def timed(x, u=None, pad_uniforms=None):
        out = real(x, u, pad_uniforms)
        returns.append(time.perf_counter())
        return out

    plan.veil.veil_batch = timed
    real_key = shards._keys.opaque_key
    monkeypatch.setattr(shards._keys, "opaque_key", lambda *a: (time.sleep(0.01), real_key(*a))[1])
    summary = shards.run(plan, batch_size=4, progress=False)
    t0 = time.perf_counter() - summary["seconds"]  # the run's start, to the microseconds its return took
    assert summary["complete"]
    assert abs((returns[0] - t0) - summary["timings"]["first_batch_s"]) < 0.01
    assert summary["steady_img_s"] == pytest.approx(
        (summary["images_veiled"] - 4) / (returns[-1] - returns[0]), rel=0.05)


def test_a_failed_warm_up_only_warns(data, tmp_path, caplog):
    """The GPU warm-up is an optimization: if it fails, the run goes on and the first batch warms up."""
    plan = shards.prepare(data["src"], tmp_path / "out", str(data["model"]), key_file=data["key_file"],
                          steps=1, device="cpu", shard_size=10)
    calls = []

    def broken(n, shape):
        calls.append((n, tuple(shape)))
        raise RuntimeError("CUDA out of memory (simulated)")

    plan.veil.warm_up = broken
    with caplog.at_level("WARNING", logger="veil_transforms"):
        summary = shards.run(plan, batch_size=8, progress=False)
    assert calls == [(8, tuple(plan.header["source"]["sample_shape"]))]  # one batch's worth, the source's shape
    assert summary["complete"] and summary["timings"]["warm_up_s"] is None
    assert any("warm-up failed" in r.getMessage() for r in caplog.records)
    ref = shards.prepare(data["src"], tmp_path / "ref", str(data["model"]), key_file=data["key_file"],
                         steps=1, device="cpu", shard_size=10)
    shards.run(ref, batch_size=8, progress=False)
    assert shas(tmp_path / "out") == shas(tmp_path / "ref")


def test_manifest_records_benchmark_runs(capsys):
    """benchmarks/manifest_records.py, cited in the README, broke on its own hand-made manifest."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "manifest_records.py"
    spec = importlib.util.spec_from_file_location("manifest_records", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--shards", "20", "--pace-ms", "1"])
    assert capsys.readouterr().out.count("records for 20 shards") == 2


def test_manifest_records_are_spaced_by_their_cost(data, tmp_path, monkeypatch):
    """The manifest is rewritten whole per record, so records wait while the last one is recent
    compared with its cost; what waits is recorded at the end, also when the run fails."""
    calls = []
    real = shards.record_shards
    monkeypatch.setattr(shards, "record_shards", lambda out, entries: calls.append(len(entries)) or real(out, entries))
    monkeypatch.setattr(shards, "MANIFEST_SPACING", 1e9)  # after the first record, none until the end
    out = tmp_path / "spaced"
    assert shard_cli.main(_argv(data, out)) == 0
    assert calls == [1, 15]
    shards.verify(out)
    assert snapshot(out) == snapshot(data["ref"]) and shas(out) == shas(data["ref"])
    calls.clear()
    monkeypatch.setattr(shards, "MANIFEST_SPACING", 0)  # every shard at once
    assert shard_cli.main(_argv(data, tmp_path / "each")) == 0
    assert calls == [1] * 16
    # a failed run still records every shard it finished
    calls.clear()
    monkeypatch.setattr(shards, "MANIFEST_SPACING", 1e9)
    plan = shards.prepare(data["src"], tmp_path / "failed", str(data["model"]), key_file=data["key_file"],
                          steps=3, lr=0.1, device="cpu", shard_size=4)
    real_veil, n = plan.veil.veil_batch, []

    def flaky(x, u=None, pad_uniforms=None):
        n.append(1)
        if len(n) == 8:
            raise RuntimeError("simulated")
        return real_veil(x, u, pad_uniforms)

    plan.veil.veil_batch = flaky
    with pytest.raises(RuntimeError, match="simulated"):
        shards.run(plan, batch_size=4, progress=False)
    files = {p.name for p in (tmp_path / "failed").glob("veil-*.tar")}
    assert len(files) >= 5 and calls[0] == 1 and len(calls) == 2
    assert {s["name"] for s in shards.read_manifest(tmp_path / "failed")["shards"]} == files


def test_a_failed_batch_never_finishes_its_shard(data, tmp_path):
    """An error in the veil (say, CUDA out of memory) mid-shard: the shard is not recorded, and a
    rerun gives exactly the uninterrupted result. Batches of 4 run across shards of 10: the fifth
    batch (images 16-19) ends the second shard, and the third batch (8-11) spans the first two."""
    kw = dict(key_file=data["key_file"], steps=3, lr=0.1, device="cpu")
    plan = shards.prepare(data["src"], tmp_path / "out", str(data["model"]), shard_size=10, **kw)
    real, calls = plan.veil.veil_batch, []

    def flaky(x, u=None, pad_uniforms=None):
        calls.append(len(x))
        if len(calls) == 5:  # the last batch of the second shard: its "end" is queued behind it
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(x, u, pad_uniforms)

    plan.veil.veil_batch = flaky
    with pytest.raises(RuntimeError, match="simulated"):
        shards.run(plan, batch_size=4, progress=False)
    recorded = [s["index"] for s in shards.read_manifest(tmp_path / "out")["shards"]]
    assert 1 not in recorded and 0 in recorded
    assert not any(p.name.startswith("veil-000001") for p in (tmp_path / "out").iterdir())
    ref = shards.prepare(data["src"], tmp_path / "ref", str(data["model"]), shard_size=10, **kw)
    real_ref, sizes = ref.veil.veil_batch, []

    def slow(x, u=None, pad_uniforms=None):
        sizes.append(len(x))
        time.sleep(0.02)
        return real_ref(x, u, pad_uniforms)

    ref.veil.veil_batch = slow
    summary = shards.run(ref, batch_size=4, progress=False)
    assert set(sizes[:-1]) == {4} and sum(sizes) == summary["images_veiled"]  # shards do not cut batches
    assert summary["steady_img_s"] > 0
    t = summary["timings"]  # where the time went: the veil's share is at least the sleeps
    assert len(sizes) * 0.02 <= t["veil_s"] <= summary["seconds"]
    assert 0 < t["first_batch_s"] <= summary["seconds"] - t["after_last_batch_s"]
    again = shards.prepare(data["src"], tmp_path / "out", str(data["model"]), shard_size=10, **kw)
    assert shards.run(again, batch_size=4, progress=False)["complete"]
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "ref")


@pytest.mark.parametrize("flag, value, needle", [
    ("--io-workers", "-3", "--io-workers: must be >= 0 (0: automatic), got -3"),
    ("--io-procs", "-1", "--io-procs: must be >= 0 (0: threads only), got -1"),
    ("--batch-size", "0", "--batch-size: must be >= 1, got 0"),
])
def test_counts_are_checked_by_argparse(data, tmp_path, capsys, flag, value, needle):
    """--io-workers -3 used to reach the thread pool ('max_workers must be greater than 0', exit 1);
    --io-procs -1 and --batch-size 0 were refused after OUT, the key and the manifest were made."""
    with pytest.raises(SystemExit) as e:
        shard_cli.main([*_argv(data, tmp_path / "o"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        shard_cli.main(["--help"])
    assert "0: automatic" in " ".join(capsys.readouterr().out.split())


def test_device_is_checked_up_front(data, tmp_path, capsys, monkeypatch):
    """--device gpu used to print torch's list of 20 device types, --device cuda without a GPU 'RuntimeError:
    Found no NVIDIA driver ... (rerun the same command to resume)', exit 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev, needle in [("gpu", "--device gpu: not a torch device; use 'cpu', 'cuda' or 'cuda:N'"),
                        ("cuda", "--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)"),
                        ("cuda:1", "--device cuda:1: no CUDA GPU is visible")]:
        assert shard_cli.main([*_argv(data, tmp_path / "o"), "--device", dev]) == 2, dev
        assert needle in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    assert shard_cli._device_problem("cpu") is None and shard_cli._device_problem("auto") is None


def test_damaged_manifest_is_one_line_naming_the_field(data, tmp_path, capsys):
    """A hand-damaged manifest.json (a list, no "shards", no "source") gave raw KeyError/AttributeError."""
    from veil_transforms.tools import export as export_cli

    good = json.loads((data["ref"] / "manifest.json").read_text())
    for damage, needle in [(lambda m: [m], "expected a JSON object, got a JSON list"),
                           (lambda m: {k: v for k, v in m.items() if k != "shards"}, "missing field 'shards'"),
                           (lambda m: {k: v for k, v in m.items() if k != "source"}, "missing field 'source'"),
                           (lambda m: {**m, "shards": [{**m["shards"][0], "sha256": None}]}, "field 'sha256'")]:
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(data["ref"], out)
        (out / "manifest.json").write_text(json.dumps(damage(json.loads(json.dumps(good)))))
        with pytest.raises(shards.ShardError, match=needle) as e:
            shards.read_manifest(out)
        assert "manifest.json is damaged" in str(e.value)
        with pytest.raises(shards.ShardError, match=needle):
            shards.load(out)
        assert shard_cli.main(_argv(data, out)) == 2
        assert needle in _one_line_error(capsys)
        assert export_cli.main([str(out), str(tmp_path / "dest"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_resume_rewrites_a_changed_shard_of_the_same_size(data, tmp_path, caplog):
    """Resume used to check only each recorded shard's size: a tampered shard of the same size stayed."""
    out = tmp_path / "out"
    shutil.copytree(data["ref"], out)
    t = out / "veil-000003.tar"
    b = bytearray(t.read_bytes())
    b[700] ^= 0xFF
    t.write_bytes(bytes(b))
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main([a for a in _argv(data, out) if a != "--quiet"]) == 0  # --quiet: errors only
    assert any("veil-000003.tar differs from its sha256" in r.getMessage() for r in caplog.records)
    files = lambda d: [(f.name, shards.file_sha256(f)) for f in sorted(d.glob("veil-*.tar"))]  # noqa: E731
    assert files(out) == files(data["ref"]) and shas(out) == shas(data["ref"])
    shards.verify(out)


def test_reader_errors_name_the_file_and_the_sample(tmp_path):
    """A garbage .tar gave tarfile's ReadError naming a BufferedReader; a corrupt PNG PIL's
    UnidentifiedImageError naming a BytesIO."""
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(shards.ShardError) as e:
        list(shards.load(str(garbage)))
    msg = str(e.value)
    assert str(garbage) in msg and "ReadError" in msg and "BufferedReader" not in msg and "0x" not in msg, msg
    okey = "0123456789abcdef0123456789abcdef"
    body = shards.tar_member(f"{okey}.cls", b"1") + shards.tar_member(f"{okey}.png", b"\x89PNG\r\n\x1a\n garbage")
    bad_png = tmp_path / "bad-png.tar"
    bad_png.write_bytes(body + shards.tar_end(len(body)))
    with pytest.raises(shards.ShardError) as e:
        list(shards.load(str(bad_png)))
    msg = str(e.value)
    assert str(bad_png) in msg and f"sample {okey}" in msg and "BytesIO" not in msg and "0x" not in msg, msg
    assert len(list(shards.load(str(bad_png), decode=False))) == 1  # the bytes themselves are readable


def _flat_labels(data, tmp_path, n: int, csv: str) -> list[str]:
    """veil-shard's argv for ``n`` small PNGs f0.png... in a flat folder with the labels file ``csv``."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(n):
        (flat / f"f{i}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    (tmp_path / "labels.csv").write_text(csv)
    return [str(flat), str(tmp_path / "o"), "--labels", str(tmp_path / "labels.csv"), "--model", str(data["model"]),
            "--key-file", str(data["key_file"]), *COMMON]


def test_a_rerun_with_a_class_renamed_is_refused(data, tmp_path, capsys):
    """A labels file's class renamed (cat -> ant: the same indices, so the same listing hash) continued the
    OUT, whose manifest kept the old names (a review of the day's diff)."""
    argv = _flat_labels(data, tmp_path, 4, "filename,label\nf0.png,cat\nf1.png,dog\nf2.png,cat\nf3.png,dog\n")
    assert shard_cli.main(argv) == 0
    (tmp_path / "labels.csv").write_text("filename,label\nf0.png,ant\nf1.png,dog\nf2.png,ant\nf3.png,dog\n")
    assert shard_cli.main(argv) == 2
    assert "the class names (a class renamed" in _one_line_error(capsys)


def test_negative_label_in_csv_is_refused_naming_the_row(data, tmp_path, capsys):
    """A negative label was taken as 'no label' and its image skipped."""
    argv = _flat_labels(data, tmp_path, 3, "filename,label\nf0.png,0\n\nf1.png,-1\nf2.png,1\n")  # a blank line
    assert shard_cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert "line 4 (f1.png): label -1 is negative" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rows, needle", [
    ("f0.png,0\nf1.png,2\nf2.png,unknown\n", "line 4 (f2.png): label 'unknown' mixes class indices and class names"),
    ("f0.png,cat\nf1.png,dog\nf2.png,3\n", "line 4 (f2.png): label '3' mixes"),
    ("f0.png,0\nf1.png,\nf2.png,1\n", "line 3 (f1.png): the label is empty"),
])
def test_labels_that_mix_indices_and_names_are_refused(data, tmp_path, capsys, rows, needle):
    """Sorted as names, "10" < "2": one stray name silently renumbered every integer label."""
    argv = _flat_labels(data, tmp_path, 3, "filename,label\n" + rows)
    assert shard_cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert needle in err, err


def test_labels_csv_saved_with_a_byte_order_mark(data, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        (flat / f"f{i}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    (tmp_path / "labels.csv").write_bytes("filename,label\nf0.png,1\nf1.png,0\n".encode("utf-8-sig"))  # Excel
    argv = [str(flat), str(tmp_path / "o"), "--labels", str(tmp_path / "labels.csv"), "--model", str(data["model"]),
            "--key-file", str(data["key_file"]), *COMMON]
    assert shard_cli.main(argv) == 0 and shards.read_manifest(tmp_path / "o")["num_veiled"] == 2


def test_images_beside_class_folders_are_an_error_not_a_silent_loss(data, tmp_path, capsys):
    """A flat folder with one sub-folder (thumbs/, __MACOSX/) was read as an ImageFolder: its top-level
    images vanished, exit 0."""
    src = tmp_path / "src"
    (src / "thumbs").mkdir(parents=True)
    for i in range(3):
        (src / f"f{i}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    (src / "thumbs" / "t.png").write_bytes(_png(np.zeros((12, 12), np.uint8)))
    argv = [str(src), str(tmp_path / "o"), "--model", str(data["model"]), "--key-file", str(data["key_file"]), *COMMON]
    assert shard_cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert "holds 3 image(s) at its top level (e.g. f0.png) beside class folders (thumbs)" in err, err


def test_folder_links_are_listed_once_and_loops_end(data, tmp_path):
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(2):
            (src / c / f"{i}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    (src / "b" / "sub").mkdir()
    (src / "b" / "sub" / "2.png").write_bytes(_png(np.zeros((12, 12), np.uint8)))
    (src / "a" / "self").symlink_to("../a")  # a loop: listed each image once per depth (41 times)
    (src / "a" / "up").symlink_to("..")  # a second loop: the listing never ended
    (src / "a" / "to-b").symlink_to("../b")  # class b's images under label a
    (src / "a" / "into-b").symlink_to("../b/sub")  # a sub-folder of class b, under label a
    # a folder above SRC (a "data root" shortcut): every other class under label a, and files beside SRC
    # (elsewhere/3.png, linked into b below) too, exit 0 (a helper's review at scale)
    (src / "a" / "root").symlink_to(tmp_path)
    outside = tmp_path / "elsewhere"  # data on another disk, linked in: followed, once
    outside.mkdir()
    (outside / "3.png").write_bytes(_png(np.zeros((12, 12), np.uint8)))
    (outside / "loop").symlink_to(".")
    (src / "b" / "ext").symlink_to(outside)
    (src / "b" / "ext-again").symlink_to(outside)
    source = shards.open_source(src)
    got = sorted((it.rel, source.classes[it.label]) for it in source.items)
    assert got == [("a/0.png", "a"), ("a/1.png", "a"), ("b/0.png", "b"), ("b/1.png", "b"), ("b/ext/3.png", "b"),
                   ("b/sub/2.png", "b")], got
    (src / "alias").symlink_to("b")  # a class that is another class: not followed, so a class without images
    source = shards.open_source(src)
    assert source.classes == ["a", "alias", "b"] and 1 not in {it.label for it in source.items}  # said, kept


def test_a_bind_mount_of_a_folder_above_src_is_not_followed(tmp_path):
    """The rule above compared real paths, which a bind mount hides (another path, the same folder): a
    class holding a bind mount of SRC's parent listed every class under its label, and files beside SRC
    (a review of the day's diff). Folders are compared by device and inode too."""
    src = tmp_path / "data" / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        (src / c / "0.png").write_bytes(_png(np.full((12, 12), 40, np.uint8)))
    (tmp_path / "data" / "beside.png").write_bytes(_png(np.zeros((12, 12), np.uint8)))
    mnt, mntb = src / "a" / "mnt", src / "a" / "mntb"  # SRC's parent; class b (listed under a, and under b)
    mnt.mkdir()
    mntb.mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "data"), str(mnt)], capture_output=True).returncode:
        pytest.skip("bind mounts need root and a mount namespace")
    try:
        subprocess.run(["mount", "--bind", str(src / "b"), str(mntb)], check=True)
        try:
            source = shards.open_source(src)
            got = sorted((it.rel, source.classes[it.label]) for it in source.items)
        finally:
            subprocess.run(["umount", str(mntb)], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert got == [("a/0.png", "a"), ("b/0.png", "b")], got


def test_a_file_name_that_is_not_utf8_is_named_exit_2(data, tmp_path, capsys):
    """It failed the run with a UnicodeEncodeError, exit 1, 'rerun to resume' (which failed the same way)."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "ok.png").write_bytes(_png(np.zeros((12, 12), np.uint8)))
    with open(os.path.join(os.fsencode(src / "a"), b"bad\xffname.png"), "wb") as f:
        f.write(_png(np.zeros((12, 12), np.uint8)))
    argv = [str(src), str(tmp_path / "o"), "--model", str(data["model"]), "--key-file", str(tmp_path / "new.key"), *COMMON]
    assert shard_cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert "not valid UTF-8, e.g. 'a/bad\\udcffname.png'" in err, err
    assert not (tmp_path / "new.key").exists() and not (tmp_path / "o").exists()  # nothing made before the error


def test_out_must_not_be_the_folder_of_source_tars(data, tmp_path, capsys):
    """Its shards joined the source listing: the run could never be resumed or exported with the gate."""
    src = tmp_path / "tars"
    src.mkdir()
    with tarfile.open(src / "src.tar", "w") as tf:
        for i in range(3):
            for name, payload in ((f"s{i}.png", _png(np.full((12, 12), 50 * i, np.uint8))), (f"s{i}.cls", b"0")):
                ti = tarfile.TarInfo(name)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    argv = [str(src), str(src), "--model", str(data["model"]), "--key-file", str(data["key_file"]), *COMMON]
    for out in (src, src / "veiled"):  # a sub-folder made the source read as an ImageFolder on resume
        assert shard_cli.main([str(src), str(out), *argv[2:]]) == 2
        assert "must not be inside the source folder" in _one_line_error(capsys)
    tar = src / "src.tar"  # one .tar file as the source: OUT may sit beside it, and resume
    for _ in range(2):
        assert shard_cli.main([str(tar), str(src / "veiled"), *argv[2:]]) == 0


def test_unreadable_class_folder_is_an_error_not_a_silent_loss(data, tmp_path, capsys):
    """os.walk left out a class folder it could not list: its images vanished, unlisted, exit 0.
    Needs real permissions: skipped as root with CAP_DAC_OVERRIDE (run it under a shell without it)."""
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(2):
            (src / c / f"{i}.png").write_bytes(_png(np.full((12, 12), 50 * i, np.uint8)))
    (src / "a").chmod(0)
    try:
        if os.access(src / "a", os.R_OK):
            pytest.skip("this user reads folders of mode 0 (root with CAP_DAC_OVERRIDE)")
        assert shard_cli.main([str(src), str(tmp_path / "o"), "--model", str(data["model"]),
                               "--key-file", str(data["key_file"]), *COMMON]) == 2
        err = _one_line_error(capsys)
        assert f"cannot list folder {src / 'a'}" in err and "left out" in err, err
    finally:
        (src / "a").chmod(0o755)


def test_reference_size_is_the_most_common_one(data, tmp_path, capsys):
    """The size came from the first file in sort order: one outlier there made every other image a
    "size mismatch" (skipped, exit 0). Now the most common size wins, and when more than half of the
    images are skipped for size anyway, veil-shard says so and exits 1."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "000-outlier.png").write_bytes(_png(np.zeros((10, 10), np.uint8)))
    for i in range(5):
        (src / "a" / f"{i + 1:03d}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    argv = [str(src), str(tmp_path / "o"), "--model", str(data["model"]), "--key-file", str(data["key_file"]), *COMMON]
    assert shard_cli.main(argv) == 0
    m = shards.read_manifest(tmp_path / "o")
    assert m["source"]["sample_shape"] == [1, 12, 12] and m["num_veiled"] == 5
    assert [sk["path"] for sk in m["skipped"]] == ["a/000-outlier.png"]
    capsys.readouterr()
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    for i, n in enumerate([12, 12, 12, 10, 10, 8, 8]):
        (mixed / "a" / f"{i}.png").write_bytes(_png(np.full((n, n), 30 * i, np.uint8)))
    assert shard_cli.main([str(mixed), str(tmp_path / "o2"), *argv[2:]]) == 1
    err = _one_line_error(capsys)
    assert "4 of 7 images were skipped for size mismatch (not 12x12" in err and "resize" in err, err


def test_reference_channels_are_the_most_common_ones(data, tmp_path):
    """One grey image first in sort order made a colour folder "not accepted" by a colour model."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "000-grey.png").write_bytes(_png(np.full((12, 12), 99, np.uint8)))
    for i in range(4):
        (src / "a" / f"{i + 1:03d}.png").write_bytes(_png(np.full((12, 12, 3), 40 * i, np.uint8)))
    argv = [str(src), str(tmp_path / "o"), "--model", str(data["root"] / "rgb_model.pt"),
            "--key-file", str(data["key_file"]), *COMMON]
    assert shard_cli.main(argv) == 0
    m = shards.read_manifest(tmp_path / "o")
    assert m["source"]["sample_shape"] == [3, 12, 12] and m["num_veiled"] == 5  # the grey one as RGB


def test_truncated_source_tar_is_reported_even_quiet(data, tmp_path, capsys):
    """A source .tar cut at a member boundary read as a complete tar with fewer samples, reported nowhere."""
    tar_path = tmp_path / "src.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i in range(4):
            for name, payload in ((f"s{i}.png", _png(np.full((12, 12), 50 * i, np.uint8))), (f"s{i}.cls", b"0")):
                ti = tarfile.TarInfo(name)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    with tarfile.open(tar_path) as tf:
        cut = tf.getmember("s2.png").offset  # the third sample's first header
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(tar_path.read_bytes()[:cut])
    assert [it.rel for it in shards.open_source(tar_path).items] == [f"src.tar/s{i}" for i in range(4)]
    assert not shards.open_source(tar_path).errors
    src = shards.open_source(cut_path)
    assert len(src.items) == 2 and "no end-of-archive marker" in src.errors[0]
    argv = [str(cut_path), str(tmp_path / "o"), "--model", str(data["model"]), "--key-file", str(data["key_file"]),
            *COMMON]
    assert shard_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "veil-shard: warning: source shard cut.tar: no end-of-archive marker after 2 samples" in err, err
    assert "no end-of-archive marker" in shards.read_manifest(tmp_path / "o")["source"]["errors"][0]


def test_paper_mode_warns_hardened_does_not(data, tmp_path, capsys):
    argv = [a for a in _argv(data, tmp_path / "p") if a != "--quiet"]
    assert shard_cli.main(argv + ["--mode", "paper"]) == 0
    assert "--mode paper is the paper's veil" in capsys.readouterr().err
    assert shard_cli.main([a for a in _argv(data, tmp_path / "h") if a != "--quiet"] + ["--mode", "hardened"]) == 0
    assert "--mode paper" not in capsys.readouterr().err


def test_copies_veil_each_image_once_per_copy_key_and_the_tools_follow(data, tmp_path, capsys, monkeypatch):
    """--copies K (the hardened recipe: 4 veils of 75 steps): copy c of an image is the library's veil
    under hardened.copy_keys(key, K)[c]; veil-export's gate and veil-audit map all copies back."""
    from veil_transforms.hardened import copy_keys
    from veil_transforms.tools import audit as audit_cli
    from veil_transforms.tools import export as export_cli

    from veil_transforms import hardened

    out, key = tmp_path / "copies", keys.read_key_file(data["key_file"])

    def on_the_veil_thread(*a):  # the decoding workers derive the pad (checked against the library below)
        raise AssertionError("the hardened pad was hashed on the veil thread")

    with monkeypatch.context() as mp:
        mp.setattr(hardened, "pad_uniforms", on_the_veil_thread)
        assert shard_cli.main([*_argv(data, out), "--copies", "2", "--mode", "hardened"]) == 0
    m = shards.verify(out)
    n_items = N_GOOD + 3
    assert m["copies"] == 2 and m["num_shards"] == -(-2 * n_items // SHARD_SIZE)
    assert m["num_veiled"] == 2 * N_GOOD and m["num_skipped"] == 2 * 3
    line = shard_cli._summary_line(out)
    assert f"{2 * N_GOOD} veils (2 per image)" in line and "(3 images (6 veils) skipped" in line, line
    source = shards.open_source(data["src"])
    owner = shards.opaque_keys(key, 2, source.items)
    got = snapshot(out)
    assert set(got) <= set(owner) and len(got) == 2 * N_GOOD
    assert {sk["key"] for sk in m["skipped"]} <= set(owner)
    ks = copy_keys(key, 2)
    assert all(owner[k].key == ks[owner[k].copy] for k in got)
    assert sorted((owner[k].item.rel, owner[k].copy) for k in got) == sorted(
        (it.rel, c) for c in range(2) for it in source.items if it.rel not in {sk["path"] for sk in m["skipped"]})
    # the pixels: one shard of the second copy against VeilTransform under that copy's key
    last = m["shards"][-1]
    smp = list(shards.read_tar_samples(out / last["name"]))
    assert all(owner[s["__key__"]].key == ks[1] for s in smp)
    x = torch.stack([torch.from_numpy(shards.decode_image(source.read_bytes(owner[s["__key__"]].item))) for s in smp])
    veil = VeilTransform(str(data["model"]), key=ks[1], steps=3, mode="hardened", device="cpu")
    assert np.array_equal(veil.veil_batch(x).numpy(), np.stack([shards.decode_image(s["png"]) for s in smp]))
    # two copies of one image are two different veils
    rel = owner[smp[0]["__key__"]].item.rel
    twins = [got[k][1] for k, o in owner.items() if o.item.rel == rel]
    assert len(twins) == 2 and twins[0] != twins[1]
    # a resume with another --copies is refused; the gate's content tags hold for every copy
    assert shard_cli.main([*_argv(data, out), "--copies", "1", "--mode", "hardened"]) == 2
    assert "--copies (2 there, 1 now: rerun with --copies 2)" in capsys.readouterr().err
    assert shard_cli.main([*_argv(data, tmp_path / "many"), "--copies", str(shards.MAX_COPIES + 1)]) == 2
    assert f"--copies must be an integer from 1 to {shards.MAX_COPIES}" in capsys.readouterr().err
    assert not (tmp_path / "many").exists() or not any((tmp_path / "many").iterdir())  # refused before any file
    dest = tmp_path / "dest"
    assert export_cli.main([str(out), str(dest), "--originals", str(data["src"]), "--key-file", str(data["key_file"]),
                            "--quiet", "--force"]) == 0, capsys.readouterr().err
    receipt = json.loads((dest / "receipt.json").read_text())
    assert receipt["num_samples"] == 2 * N_GOOD and receipt["copies"] == 2
    rows = list(csv.DictReader(open(out.parent / f"{out.name}.private-map.csv")))
    assert len(rows) == 2 * N_GOOD and {r["copy"] for r in rows} == {"0", "1"}
    assert all(owner[r["opaque_key"]].item.rel == r["path"] and owner[r["opaque_key"]].copy == int(r["copy"]) for r in rows)
    code = audit_cli.main(["--originals", str(data["src"]), "--veiled", str(out), "--key-file", str(data["key_file"]),
                           "--attacks", "fold", "--quiet", "--out", str(tmp_path / "audit")])
    report = capsys.readouterr().out
    assert code in (0, 1) and f"over {2 * N_GOOD} samples" in report, report
    # the exported DEST (a receipt, no manifest) and one shard file of the OUT: the copies are found (was:
    # "no sample matches")
    code = audit_cli.main(["--originals", str(data["src"]), "--veiled", str(dest), "--key-file", str(data["key_file"]),
                           "--attacks", "fold", "--quiet", "--out", str(tmp_path / "a2")])
    report = capsys.readouterr().out
    assert code in (0, 1) and f"over {2 * N_GOOD} samples" in report, report
    code = audit_cli.main(["--originals", str(data["src"]), "--veiled", str(out / last["name"]),
                           "--key-file", str(data["key_file"]), "--attacks", "fold", "--quiet", "--out", str(tmp_path / "a1")])
    report = capsys.readouterr().out
    assert code in (0, 1) and f"over {last['count']} samples" in report, report
    # a damaged "copies" field is named in one line
    m_path = out / "manifest.json"
    for bad in (None, "2", 2.0, True, 0, shards.MAX_COPIES + 1):
        mm = json.loads(m_path.read_text())
        mm["copies"] = bad
        m_path.write_text(json.dumps(mm))
        with pytest.raises(shards.ShardError, match="field 'copies' is not an integer"):
            shards.read_manifest(out)
        assert audit_cli.main(["--originals", str(data["src"]), "--veiled", str(out), "--key-file", str(data["key_file"]),
                               "--attacks", "fold", "--quiet"]) == 2
        assert "field 'copies' is not an integer" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("procs", ["--io-procs", "--nproc"])
def test_io_processes_exit_after_kill9_of_veil_shard(data, tmp_path, procs):
    """A killed veil-shard must not leave its spawned I/O processes waiting for work forever, nor its
    --nproc rank processes writing into OUT beside the user's rerun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    argv = [*_argv(data, tmp_path / "out"), procs, "2", "--steps", "100000", "--threshold=-inf"]
    p = subprocess.Popen([sys.executable, "-m", "veil_transforms.tools.shard", *argv], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while len(kids := _children(p.pid)) < 2 and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    try:
        assert len(kids) >= 2, "the I/O processes did not start"
        time.sleep(1.0)  # past their start-up
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t0 = time.monotonic()
        while (alive := [k for k in kids if _running(k)]) and time.monotonic() - t0 < 15:
            time.sleep(0.2)
        assert not alive, f"I/O processes {alive} outlived veil-shard"
    finally:
        for k in kids:
            with contextlib.suppress(OSError):
                os.kill(k, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["paper", "hardened"])
def test_a_key_uniform_of_exactly_one_is_veiled_not_refused(data, tmp_path, monkeypatch, mode):
    """uint32 / 2^32 rounds to 1.0 in float32 for the top 128 values (one pixel in 2^25): the mask's and
    the pad's uniforms passed ahead were refused ("must be in [0, 1)"), and veil-shard failed on such an
    image at every resume (a 60k MNIST run hit one with probability ~0.75; hardened: ~0.94)."""
    real = keys._uniforms_np

    def with_a_one(raw, shape):
        u = real(raw, shape)
        u.reshape(len(u), -1)[:, 5] = 1.0  # in every sample, mask and pad streams alike
        return u

    monkeypatch.setattr(keys, "_uniforms_np", with_a_one)
    out = tmp_path / "out"
    assert shard_cli.main([*_argv(data, out), "--mode", mode]) == 0
    key, source = keys.read_key_file(data["key_file"]), shards.open_source(data["src"])
    owner = shards.opaque_keys(key, 1, source.items)
    smp = list(shards.read_tar_samples(out / "veil-000000.tar"))
    x = torch.stack([torch.from_numpy(shards.decode_image(source.read_bytes(owner[s["__key__"]].item))) for s in smp])
    veil = VeilTransform(str(data["model"]), key=key, steps=3, mode=mode, device="cpu")
    assert np.array_equal(veil.veil_batch(x).numpy(), np.stack([shards.decode_image(s["png"]) for s in smp]))


def test_a_new_key_is_owner_only_and_the_flags_reach_the_run(tmp_path, capsys, caplog, monkeypatch):
    """Without --key-file veil-shard makes <OUT>.key (0600) and says so even under --quiet; --precision
    reaches the veil (recorded in the manifest); each shard is fsynced before its rename; --quiet hides
    the library's warnings and the progress bar, which show without it."""
    torch.manual_seed(0)
    torch.jit.script(LeNet5(1, 3).eval()).save(str(tmp_path / "m.pt"))
    rng = np.random.default_rng(0)
    (tmp_path / "src" / "a").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "src" / "a" / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (12, 12), dtype=np.uint8)))
    (tmp_path / "src" / "a" / "bad.png").write_bytes(b"not a png")
    fsynced, progress, real_fsync, real_run = [], [], os.fsync, shards.run
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(shards, "run", lambda *a, **kw: (progress.append(kw["progress"]), real_run(*a, **kw))[1])
    out = tmp_path / "out"
    argv = [str(tmp_path / "src"), str(out), "--model", str(tmp_path / "m.pt"), "--steps", "1", "--shard-size", "2",
            "--precision", "bf16", "--io-procs", "0", "--threads", "1"]
    assert shard_cli.main([*argv, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"created a new key in {tmp_path / 'out.key'}" in err and "skipping" not in caplog.text, err
    assert stat.S_IMODE(os.stat(tmp_path / "out.key").st_mode) == 0o600
    m = shards.read_manifest(out)
    assert m["veil"]["precision"] == "bf16" and len(m["shards"]) == 3 and progress == [False]
    assert {f".{s['name']}.tmp" for s in m["shards"]} <= set(fsynced), fsynced
    shutil.rmtree(out)  # again without --quiet, with the key now there
    assert shard_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"key from {tmp_path / 'out.key'}" in err and "skipping a/bad.png" in caplog.text and progress == [False, True]


def test_exit_1_only_when_more_than_half_are_skipped_for_size(monkeypatch):
    size = {"reason": "size mismatch: 10x10, not 12x12"}
    m = {"complete": True, "copies": 1, "source": {"num_samples": 4, "sample_shape": [1, 12, 12]},
         "skipped": [size, size, {"reason": "cannot decode"}]}
    monkeypatch.setattr(shards, "read_manifest", lambda out: m)
    assert shard_cli._size_problem("out") is None  # 2 of 4: half
    m["skipped"].append(size)
    assert shard_cli._size_problem("out").startswith("3 of 4 images were skipped for size mismatch")
    m.update(copies=2, skipped=[size] * 4)  # each copy of an image is skipped: 2 images of 4
    assert shard_cli._size_problem("out") is None


# -- the reader: order, shuffling, workers, empty inputs, decoding (from a mutation review) ------------
def _tiny_shard(path, items):
    body = b"".join(shards.tar_sample(k, y, np.full((1, 2, 2), v, np.uint8)) for k, y, v in items)
    path.write_bytes(body + shards.tar_end(len(body)))


def _folder(tmp_path, n=6, receipt=True):
    d = tmp_path / "dest"
    d.mkdir()
    meta = []
    for i in range(n):
        _tiny_shard(d / f"veil-{i:06d}.tar", [(f"{i:02d}" + "a" * 30, i, i)])
        meta.append({"name": f"veil-{i:06d}.tar", "index": i})
    if receipt:
        (d / "receipt.json").write_text(json.dumps({"shards": meta[::-1]}))  # listed out of order
    return d


def test_reader_follows_the_shard_index_not_the_listing_order(tmp_path):  # R3
    d = _folder(tmp_path)
    assert [y for _, y in shards.load(d)] == list(range(6))


def test_reader_folder_without_metadata_reads_tars_sorted(tmp_path):  # R6
    d = _folder(tmp_path, receipt=False)
    assert shards.shard_urls(d) == sorted(str(p) for p in d.glob("*.tar"))


def test_reader_refuses_empty_inputs(tmp_path):  # R4 R7 R9
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards in"):
        shards.shard_urls(tmp_path / "empty")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "receipt.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match="lists no finished shards"):
        shards.shard_urls(tmp_path / "r")
    with pytest.raises(ValueError, match="no shard urls given"):
        shards.shard_urls([])


def test_reader_shuffle_is_real_and_seeded(tmp_path):  # R10 R11 R12 R13
    d = _folder(tmp_path, n=24)
    plain = [y for _, y in shards.load(d)]
    a = [y for _, y in shards.load(d, shuffle=8, seed=1)]
    b = [y for _, y in shards.load(d, shuffle=8, seed=1)]
    assert a == b and a != plain and sorted(a) == plain
    # one sample per shard and a buffer of 1: only the shard order can change
    s = [y for _, y in shards.load(d, shuffle=1, seed=1)]
    assert s != plain and s == [y for _, y in shards.load(d, shuffle=1, seed=1)]
    ds = shards.load(d, shuffle=1, seed=1)  # the same dataset, a second epoch: a new (seeded) shard order
    assert [y for _, y in ds] == s and [y for _, y in ds] != s


def test_reader_shuffles_samples_within_a_shard(tmp_path):  # R13
    d = tmp_path / "one"
    d.mkdir()
    _tiny_shard(d / "veil-000000.tar", [(f"{i:02d}" + "b" * 30, i, i) for i in range(16)])
    assert [y for _, y in shards.load(d, shuffle=8, seed=3)] != list(range(16))


def test_reader_two_workers_read_each_sample_once(tmp_path):  # R14
    d = _folder(tmp_path, n=4)
    dl = torch.utils.data.DataLoader(shards.load(d), batch_size=None, num_workers=2)
    assert sorted(int(y) for _, y in dl) == [0, 1, 2, 3]


def test_reader_names_the_missing_member(tmp_path):  # R16
    okey = "0123456789abcdef0123456789abcdef"
    body = shards.tar_member(f"{okey}.png", shards.encode_png(np.zeros((1, 2, 2), np.uint8)))
    p = tmp_path / "nocls.tar"
    p.write_bytes(body + shards.tar_end(len(body)))
    with pytest.raises(shards.ShardError, match="lacks its cls"):
        list(shards.load(str(p)))


def _enc(im, fmt="PNG"):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_grey_alpha_and_32_bit_grey_and_bad_channels():  # R18 R19 R21
    import PIL.Image

    la = PIL.Image.fromarray(np.stack([np.full((3, 3), 77, np.uint8), np.full((3, 3), 200, np.uint8)], -1), "LA")
    assert shards.decode_image(_enc(la)).shape == (1, 3, 3)
    want = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    deep = PIL.Image.fromarray(want.astype(np.int32) * 257)  # mode "I", values > 255
    assert deep.mode == "I"
    assert np.array_equal(shards.decode_image(_enc(deep, "TIFF")), want[None])
    with pytest.raises(ValueError, match="unsupported channel count"):
        shards.decode_image(_enc(la), channels=2)


# -- contracts a mutation review found no test for ----------------------------------------------------
def test_a_rerun_removes_the_tmp_files_a_killed_run_left(data, tmp_path):
    """A killed run leaves ``.veil-NNNNNN.tar.tmp`` (a shard being written) and ``.manifest.json.*.tmp`` (a
    manifest write); a rerun removes them, also beside shards that are finished by then (a rewrite of the
    shard would rename its .tmp away, a finished one is never rewritten)."""
    out = tmp_path / "out"
    shutil.copytree(data["ref"], out)
    stale = [out / f".{shards.shard_name(3)}.tmp", out / f".{shards.MANIFEST}.4242.139872.tmp"]
    for f in stale:
        f.write_bytes(b"the first half of a file")
    assert shard_cli.main(_argv(data, out)) == 0
    assert [f.name for f in stale if f.exists()] == []
    assert shas(out) == shas(data["ref"])


def test_nproc_rank_killed_by_a_signal_fails_the_run_and_stops_the_others(data, tmp_path, monkeypatch, capsys):
    """--nproc: a rank killed by a signal (the OOM killer's SIGKILL) has a negative return code; the parent
    exits 1 (not a negative status, which sys.exit() turns into 247), says to rerun, and stops the other ranks.
    (Ranks are stand-ins here: nothing is veiled.)"""
    started = []

    class Rank:
        def __init__(self, cmd, env):
            self.rank, self.stopped = int(env["RANK"]), False
            started.append(self)

        def poll(self):
            return -signal.SIGKILL if self.rank == 1 else (-signal.SIGTERM if self.stopped else None)

        def terminate(self):
            self.stopped = True

        def wait(self, timeout=None):
            return self.poll()

        def kill(self):
            self.stopped = True

    monkeypatch.setattr(shard_cli.subprocess, "Popen", Rank)
    assert shard_cli.main([*_argv(data, tmp_path / "out"), "--nproc", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("veil-shard: error: a rank failed (killed by SIGKILL)") and "out-of-memory" in err, err
    assert err.endswith("rerun the same command to resume"), err
    assert [r.rank for r in started] == [0, 1] and started[0].stopped


def test_tar_members_that_are_not_sample_files(tmp_path):
    """A source .tar is read leniently: members that are not a sample's file (a folder entry, a link, a
    file without an extension, metadata with no image, a sample's extra .json) are skipped, and the images
    are listed with their labels. veil-shard's own shards are read strictly (read_tar_samples: "raises on
    damage"): a folder entry is no member and is passed over, a file that is no sample's is refused."""
    png = _png(np.full((12, 12), 7, np.uint8))
    tar_path = tmp_path / "src.tar"

    def add(tf, name, payload=None, kind=tarfile.REGTYPE, link=""):
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.size = kind, link, len(payload or b"")
        tf.addfile(ti, io.BytesIO(payload) if payload else None)

    with tarfile.open(tar_path, "w") as tf:
        add(tf, "v1.0", kind=tarfile.DIRTYPE)
        add(tf, "README", b"made by hand")
        add(tf, "__meta__.json", b"{}")
        for i in range(3):
            for ext, payload in (("png", png), ("cls", str(i).encode()), ("json", b"{}")):
                add(tf, f"v1.0/s{i}.{ext}", payload)
        add(tf, "v1.0/s9.png", kind=tarfile.SYMTYPE, link="s0.png")
    src = shards.open_source(tar_path)
    assert [(it.rel, it.label) for it in src.items] == [(f"src.tar/v1.0/s{i}", i) for i in range(3)] and not src.errors
    okey = "0123456789abcdef0123456789abcdef"
    shard = tmp_path / "veil-000000.tar"
    with tarfile.open(shard, "w") as tf:
        add(tf, "d", kind=tarfile.DIRTYPE)
        add(tf, f"{okey}.png", png)
        add(tf, f"{okey}.cls", b"2")
    assert [(s["__key__"], s["cls"]) for s in shards.read_tar_samples(shard)] == [(okey, b"2")]
    with tarfile.open(shard, "a") as tf:
        add(tf, "README", b"made by hand")
    with pytest.raises(shards.VerifyError, match="veil-000000.tar: unexpected member 'README'"):
        list(shards.read_tar_samples(shard))


def test_an_empty_class_folder_is_said_and_keeps_its_index(data, tmp_path, caplog):
    """An empty class folder took a label index without a word (birds 0, cats 1, dogs 2): torchvision's
    ImageFolder refuses such a folder by default, numbers it with allow_empty=True (a validation split
    lacking a class keeps the train split's indices). Now one warning says so (a helper's review)."""
    src = tmp_path / "src"
    for c in ("birds", "cats", "dogs"):
        (src / c).mkdir(parents=True)
    (src / "birds" / "notes.txt").write_text("no images here")
    for c in ("cats", "dogs"):
        for i in range(2):
            (src / c / f"{i}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    with caplog.at_level("WARNING", logger="veil_transforms"):
        source = shards.open_source(src)
    assert source.classes == ["birds", "cats", "dogs"] and sorted({it.label for it in source.items}) == [1, 2]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "1 class folder(s)" in msgs[0] and "'birds'" in msgs[0], msgs
    assert "allow_empty=True" in msgs[0] and "renumber" in msgs[0]


def test_nproc_says_the_listing_warnings_once(data, tmp_path):
    """With --nproc 2 each rank process lists SRC again, and each said the listing's warnings: an empty
    class folder's three times. The parent says them; its ranks keep to errors while they prepare."""
    src = tmp_path / "src"
    shutil.copytree(data["src"], src)
    (src / "zz_empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "veil_transforms.tools.shard", str(src), str(tmp_path / "out"),
                        *data["base"][1:], *[a for a in COMMON if a != "--quiet"], "--nproc", "2"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                PYTHONWARNINGS="ignore"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("hold no images ('zz_empty')") == 1, r.stderr
    shards.verify(tmp_path / "out")


def test_images_the_labels_file_leaves_out_are_reported(data, tmp_path, caplog):
    """A flat folder with --labels: images the CSV did not name were dropped without a word ('19 images
    veiled (0 skipped)' of 22; a helper's review)."""
    flat = tmp_path / "flat"
    (flat / "sub").mkdir(parents=True)
    for i in range(4):
        (flat / f"f{i}.png").write_bytes(_png(np.full((12, 12), 40 * i, np.uint8)))
    (flat / "sub" / "g.png").write_bytes(_png(np.full((12, 12), 9, np.uint8)))
    (tmp_path / "labels.csv").write_text("filename,label\nf0.png,0\n./f1.png,1\nsub/g.png,1\n")
    with caplog.at_level("WARNING", logger="veil_transforms"):
        src = shards.open_source(flat, tmp_path / "labels.csv")
    assert len(src.items) == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "2 image file(s)" in msgs[0] and "e.g. f2.png" in msgs[0], msgs


@pytest.mark.parametrize("copies", ["1", "2"])
def test_recheck_source_veils_again_the_shards_of_edited_images(data, tmp_path, caplog, copies):
    """An image edited in SRC under the same name: a rerun checks the listing only, said all was done
    and kept the old veils; export then refused, naming no fix (a helper's review). --recheck-source
    decodes the finished shards' images and writes again those whose content tag changed (for every copy)."""
    src = tmp_path / "src"
    shutil.copytree(data["src"], src)
    out = tmp_path / "o"
    argv = [str(src), str(out), *data["base"][1:], *[a for a in COMMON if a != "--quiet"], "--copies", copies]
    assert shard_cli.main(argv) == 0
    before = {s["name"]: s["sha256"] for s in shards.read_manifest(out)["shards"]}
    victim = src / "class1" / "img004.png"
    a = np.asarray(PIL.Image.open(victim))
    victim.write_bytes(_png(255 - a))
    assert shard_cli.main(argv) == 0  # the listing is the same: nothing to do
    assert {s["name"]: s["sha256"] for s in shards.read_manifest(out)["shards"]} == before
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main([*argv, "--recheck-source"]) == 0
    after = {s["name"]: s["sha256"] for s in shards.read_manifest(out)["shards"]}
    redone = sorted(n for n in before if after[n] != before[n])
    assert len(redone) == int(copies), redone  # the shard holding the image, once per copy
    assert sum("changed in SRC since" in r.getMessage() for r in caplog.records) == int(copies)
    caplog.clear()
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main([*argv, "--recheck-source"]) == 0  # now all match
    assert not any("changed in SRC" in r.getMessage() for r in caplog.records)
    assert {s["name"]: s["sha256"] for s in shards.read_manifest(out)["shards"]} == after
    shards.verify(out)
    n = sum(s["count"] for s in shards.read_manifest(out)["shards"])
    (src / "class0" / "img007b.png").write_bytes(_png(a))  # the corrupt file, mended: veiled now
    assert shard_cli.main([*argv, "--recheck-source"]) == 0
    m = shards.read_manifest(out)
    assert not any(sk["path"] == "class0/img007b.png" for s in m["shards"] for sk in s["skipped"])
    assert sum(s["count"] for s in m["shards"]) == n + int(copies)


def test_a_labels_file_naming_a_file_twice_names_it(data, tmp_path, capsys):
    argv = _flat_labels(data, tmp_path, 2, "filename,label\nf0.png,0\nf1.png,1\nf1.png,0\n")
    assert shard_cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert "lists the same sample twice: f1.png" in err, err


def test_a_skipped_file_is_reported_once_not_once_per_copy(data, tmp_path, caplog, monkeypatch):
    argv = [*_argv(data, tmp_path / "o"), "--copies", "3"]
    argv.remove("--quiet")
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main(argv) == 0
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(msgs) == 3 and len(set(msgs)) == 3, msgs  # the corrupt, truncated and other-size files
    m = shards.read_manifest(tmp_path / "o")
    assert sum(len(s["skipped"]) for s in m["shards"]) == 9  # still recorded for every copy
    # a source of millions with 5% corrupt files printed one line per file: SKIP_LINES of them now
    monkeypatch.setattr(shards, "SKIP_LINES", 2, raising=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main([a for a in _argv(data, tmp_path / "o2") if a != "--quiet"]) == 0
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(msgs) == 3 and msgs[2] == "skipping more files: listed in manifest.json only", msgs
    monkeypatch.setattr(shards, "SKIP_LINES", 3, raising=False)  # exactly as many as there are: no note
    caplog.clear()
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main([a for a in _argv(data, tmp_path / "o3") if a != "--quiet"]) == 0
    assert len([r for r in caplog.records if r.getMessage().startswith("skipping ")]) == 3
    # ranks share the cap (it was per rank: --nproc 64 said 64 notes and up to 128 lines)
    monkeypatch.setattr(shards, "SKIP_LINES", 1, raising=False)
    for world in (2, 3):
        caplog.clear()
        with caplog.at_level("WARNING", logger="veil_transforms"):
            for rank in range(world):
                shards.write_shards(data["src"], tmp_path / f"w{world}", data["model"], key_file=data["key_file"],
                                    steps=1, shard_size=SHARD_SIZE, rank=rank, world_size=world, progress=False)
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping ")]
        assert len(said) <= 2 and sum(m.startswith("skipping more") for m in said) <= 1, said


def test_recheck_source_leaves_a_sample_skipped_for_its_label_alone(data, tmp_path, caplog):
    """A tar source's sample without a .cls is skipped ('no label') though it decodes: --recheck-source
    took it for a mended file and veiled its shard again on every rerun (a helper's review)."""
    rng = np.random.default_rng(2)
    tar_path = tmp_path / "src.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i in range(4):
            members = [(f"s{i:02d}.png", _png(rng.integers(0, 256, (12, 12), dtype=np.uint8)))]
            if i != 2:
                members.append((f"s{i:02d}.cls", str(i % 2).encode()))
            for name, payload in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    argv = [str(tar_path), str(tmp_path / "o"), "--model", str(data["model"]), "--key-file", str(data["key_file"]),
            *[a for a in COMMON if a != "--quiet"]]
    assert shard_cli.main(argv) == 0
    before = {s["name"]: s["sha256"] for s in shards.read_manifest(tmp_path / "o")["shards"]}
    assert any(sk["reason"] == "no label" for s in shards.read_manifest(tmp_path / "o")["shards"] for sk in s["skipped"])
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main([*argv, "--recheck-source"]) == 0
    assert not any("changed in SRC" in r.getMessage() for r in caplog.records)
    assert {s["name"]: s["sha256"] for s in shards.read_manifest(tmp_path / "o")["shards"]} == before


def test_a_stopped_recheck_leaves_out_incomplete_and_a_plain_rerun_finishes_it(data, tmp_path, monkeypatch):
    """A --recheck-source run stopped before it had written the shards it found changed left their old
    entries in the manifest: OUT still read complete, verified, and a plain rerun or an export without
    --originals shipped the stale veils (a helper's review)."""
    src = tmp_path / "src"
    shutil.copytree(data["src"], src)
    out = tmp_path / "o"
    argv = [str(src), str(out), *data["base"][1:], *COMMON]
    assert shard_cli.main(argv) == 0
    victim = src / "class1" / "img004.png"
    victim.write_bytes(_png(255 - np.asarray(PIL.Image.open(victim))))

    def stop(self):
        raise KeyboardInterrupt  # as a Ctrl-C or kill -9 right after the check

    with monkeypatch.context() as mp:
        mp.setattr(shards._Writer, "start", stop)
        assert shard_cli.main([*argv, "--recheck-source"]) == 130
    m = shards.read_manifest(out)
    assert not m["complete"] and len(m["shards"]) == m["num_shards"] - 1
    with pytest.raises(shards.VerifyError, match="shards are finished"):
        shards.verify(out)
    assert shard_cli.main(argv) == 0  # a plain rerun writes it again from the edited image
    shards.verify(out)
    fresh = tmp_path / "fresh"
    assert shard_cli.main([str(src), str(fresh), *data["base"][1:], *COMMON]) == 0
    assert [s["sha256"] for s in shards.read_manifest(out)["shards"]] == \
        [s["sha256"] for s in shards.read_manifest(fresh)["shards"]]


def test_recheck_source_veils_again_shards_without_a_content_tag(data, tmp_path, caplog):
    """Shards written before content tags were recorded cannot be compared with SRC: --recheck-source
    passed them silently (a helper's review); now it veils them again, the same bytes if SRC is unchanged."""
    out = tmp_path / "o"
    argv = [*_argv(data, out)]
    argv.remove("--quiet")
    assert shard_cli.main(argv) == 0
    m = shards.read_manifest(out)
    before = [s["sha256"] for s in m["shards"]]
    for s in m["shards"]:
        s.pop("source_tag")
    shards.atomic_write_json(out / "manifest.json", m)
    with caplog.at_level("WARNING", logger="veil_transforms"):
        assert shard_cli.main([*argv, "--recheck-source"]) == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"{len(before)} finished shard(s) have no content tag" in x for x in msgs), msgs
    m = shards.read_manifest(out)
    assert [s["sha256"] for s in m["shards"]] == before and all(s.get("source_tag") for s in m["shards"])


def test_quiet_still_says_what_the_listing_leaves_out(data, tmp_path, capsys):
    """--quiet hid the warnings about images a labels file does not name (never veiled) and about empty
    class folders (a helper's review); they print as the damaged-source warnings do."""
    argv = _flat_labels(data, tmp_path, 3, "filename,label\nf0.png,0\nf1.png,1\n")
    assert "--quiet" in argv and shard_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: 1 image file(s)" in err and "e.g. f2.png" in err, err


def test_a_file_the_labels_file_names_but_that_is_missing_is_skipped_as_missing(data, tmp_path):
    """It was reported as 'corrupt: FileNotFoundError' (a helper's review)."""
    argv = _flat_labels(data, tmp_path, 2, "filename,label\nf0.png,0\nf1.png,1\nghost.png,1\n")
    assert shard_cli.main(argv) == 0
    skipped = [sk for s in shards.read_manifest(tmp_path / "o")["shards"] for sk in s["skipped"]]
    assert [(sk["path"], sk["reason"]) for sk in skipped] == [("ghost.png", "missing: the file is not there")]
