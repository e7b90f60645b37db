"""veil-shard: veil a folder of images (or WebDataset shards) into veiled WebDataset shards.

    veil-shard SRC OUT --model local_model.pt [--steps 300] [--shard-size 1000] [--nproc 2]

SRC is an ImageFolder tree (one sub-folder per class; class index = sorted
folder names), a flat folder with ``--labels labels.csv`` (columns
filename,label), or existing WebDataset shards (a .tar, a folder of .tar, or a
brace pattern). OUT receives ``veil-NNNNNN.tar`` shards and ``manifest.json``.

The secret key lives in ``--key-file`` (default: ``<OUT>.key`` beside OUT,
created with mode 0600 if absent; never inside OUT). Keep it: it maps the
opaque sample keys back to file names and is needed to resume or extend OUT.

Runs are resumable: rerun the same command after an interruption (even
``kill -9``) and it continues where it stopped. Several processes split the
work under ``torchrun --nproc_per_node N -m veil_transforms.tools.shard ...``
or with ``--nproc N``; the result is identical to a one-process run.

Exit codes: 0 done, 1 runtime failure, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from veil_transforms import keys as _keys
from veil_transforms import shards

from ._common import debug, disk_full, fail, int_at_least, setup_logging, torch_threads

PROG = "veil-shard"
LISTING_NOTICE_AFTER = 3.0  # seconds of listing before veil-shard says it is listing


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: veil-shard's spawned I/O processes import this module again
    # and must start without torch
    from veil_transforms import functional as F

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Veil images into WebDataset shards (resumable, multi-process).",
        epilog=(
            "Corrupt or unreadable images, and images whose height/width differ from the most common "
            "size (among 33 sampled), are skipped and listed in OUT/manifest.json (more than half "
            "skipped for size: exit 1); images are converted to the most common channel count. "
            "Exit codes: 0 ok, 1 failure, 2 bad input."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="ImageFolder tree, flat folder (with --labels), or .tar shards")
    p.add_argument("out", metavar="OUT", help="output folder for veil-NNNNNN.tar and manifest.json")
    p.add_argument("--model", required=True, help="the local model F: TorchScript .pt, state dict .pt (with --arch) or .onnx")
    p.add_argument("--arch", default=None, help="architecture of a state-dict model: lenet5 or a torchvision name")
    p.add_argument("--layer", default=None, help="inner layer of F to match; None: the output logits")
    p.add_argument("--labels", default=None, help="CSV with columns filename,label for a flat SRC folder")
    p.add_argument("--key-file", default=None,
                   help="secret key file (hex); None: <OUT>.key beside OUT, created 0600 if absent")
    p.add_argument("--p", type=float, default=F.PAPER["p"], help="pixel flip probability, in (0, 1)")
    p.add_argument("--alpha", type=float, default=F.PAPER["alpha"], help="weight of the output-matching loss")
    p.add_argument("--beta", type=float, default=F.PAPER["beta"], help="weight of the distance term")
    p.add_argument("--steps", type=int, default=F.PAPER["steps"], help="gradient-iteration steps")
    p.add_argument("--threshold", type=float, default=F.PAPER["threshold"],
                   help="per-sample early-stop loss (--threshold=-inf: never stop early)")
    p.add_argument("--lr", type=float, default=F.DEFAULT_LR, help="gradient-iteration step size")
    p.add_argument("--mode", default="paper", choices=sorted(F.MODES), help="veil algorithm")
    p.add_argument("--copies", type=int, default=1,
                   help=f"veils per image (1 to {shards.MAX_COPIES}); for K > 1 each under its own key derived from the "
                        "key file (hardened.copy_keys); the hardened recipe is --mode hardened --steps 75 --copies 4 "
                        "(300 steps per image, as one paper veil; 0.86-1.47x its time in benchmarks/results/frontier*.md)")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="images veiled together")
    p.add_argument("--precision", default="fp32", choices=F.PRECISIONS,
                   help="F's arithmetic in the loop; bf16 is faster on GPUs for large models and changes the "
                        "veil (5 grey levels on average), not its utility: on MNIST, on an H100, -0.07 +- 0.17 "
                        "points against the fp32 veil over 40 keys (README, 'Speed'); on a CPU without native bf16 "
                        "(AVX2 only) 3-15x slower than fp32")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run the loop eagerly on the GPU (by default its steps are replayed as CUDA graphs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile F and the loss: faster per step on GPUs, costs a compilation per process up "
                        "front; on the CPU measured slower than eager (0.56x LeNet-5, 0.79x ResNet-18)")
    p.add_argument("--fold-bn", action="store_true", help="fold F's BatchNorm layers into the convolutions")
    p.add_argument("--fast", action="store_true", help="--compile and --fold-bn (both keep the veil up to float rounding)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--io-workers", type=int_at_least(0, " (0: automatic)"), default=0,
                   help="image decoding threads (without --io-procs); 0: automatic, min(8, CPUs) and at least 2")
    p.add_argument("--io-procs", type=int_at_least(0, " (0: threads only)"), default=None,
                   help="processes that decode, hash and PNG-encode instead of threads (0: threads only). "
                        "Default: half the CPUs, at most 8, when there are 8+ CPUs, one rank and 20,000+ images, else 0. They "
                        "lift the one-process GIL cap (~2.5-4.5k small images/s, by CPU) when the GPU veils faster")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0: torch's default; with --nproc N, the CPUs / N in each "
                        "rank process)")
    p.add_argument("--recheck-source", action="store_true",
                   help="on a rerun, also decode the images of the finished shards and veil again those whose "
                        "images changed in SRC under the same names (a rerun checks the file listing only; "
                        "costs one decode of every finished image)")
    p.add_argument("--nproc", type=int, default=1, help="processes to split the shards over (or use torchrun)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no notices, except that a new key was created and what the source "
                        "leaves out (damaged shards, unlisted images, empty class folders); errors and the "
                        "one-line summary still print")
    p.add_argument("-v", "--verbose", action="store_true", help="log every shard")
    return p


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun-style environment variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    return 0, 1, 0


def _device_problem(arg: str) -> str | None:
    """Why --device cannot be used here (one line), or None: the library's check, up front."""
    if arg == "auto":
        return None
    from veil_transforms import functional as F

    why = F.device_problem(arg)
    return f"--device {arg}: {why}" if why else None


def _device(arg: str, local_rank: int, world: int):
    import torch

    if arg == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{local_rank % torch.cuda.device_count()}" if world > 1 else "cuda"
    if arg == "cuda" and world > 1 and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return arg


def _prepare(args, *, rank: int, world: int, local_rank: int) -> shards.Plan:
    # the hold on OUT: --nproc's parent holds it for its rank processes; torchrun's ranks share it
    lock = None if os.environ.get("_VEIL_SHARD_CHILD") == "1" else "shared" if world > 1 else "exclusive"
    # listing and keying a large SRC takes a while before the first notice or bar: say so when it does
    notice = threading.Timer(LISTING_NOTICE_AFTER, lambda: print(
        f"{PROG}: listing {args.src} and checking the model ...", file=sys.stderr, flush=True))
    notice.daemon = True
    if not args.quiet and rank == 0 and lock is not None:
        notice.start()
    try:
        with _said_by_rank0(rank == 0 and lock is not None):
            return _prepare_plan(args, rank, world, local_rank, lock)
    finally:
        notice.cancel()


@contextlib.contextmanager
def _said_by_rank0(me: bool):
    """The library's warnings while listing SRC and loading F (an empty class folder, images a labels file
    leaves out, ...) are the same in every rank: said once, by --nproc's parent or torchrun's rank 0."""
    logger = logging.getLogger("veil_transforms")
    before = logger.level
    if not me:
        logger.setLevel(max(before, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(before)


def _prepare_plan(args, rank: int, world: int, local_rank: int, lock) -> shards.Plan:
    return shards.prepare(
        args.src, args.out, args.model, labels=args.labels, key_file=args.key_file, arch=args.arch, lock=lock, rank=rank,
        layer=args.layer, shard_size=args.shard_size, device=_device(args.device, local_rank, world),
        create_key=rank == 0, copies=args.copies, p=args.p, alpha=args.alpha, beta=args.beta, steps=args.steps,
        threshold=args.threshold, lr=args.lr, mode=args.mode, precision=args.precision,
        cuda_graph=False if args.no_cuda_graph else None, compile=args.fast or args.compile,
        fold_bn=args.fast or args.fold_bn,
    )


def _source_warnings(plan: shards.Plan, quiet: bool) -> None:
    """Damaged or truncated source shards lose samples, and a listing can leave images out (a labels file
    that does not name them) or number classes oddly (an empty class folder): shown under --quiet too
    (the library's warnings are hidden there)."""
    if quiet:
        for e in plan.source.errors:
            print(f"{PROG}: warning: source shard {e}: samples may be missing", file=sys.stderr, flush=True)
        for n in plan.source.notices:
            print(f"{PROG}: warning: {n}", file=sys.stderr, flush=True)


def _mode_notice(args) -> None:
    """After the input checked out (errors stay one line): the default mode is not the one to ship."""
    if args.mode == "paper" and not args.quiet:
        print(f"{PROG}: warning: --mode paper is the paper's veil, which a key-free fold attack reads "
              "(veil-audit fails it, veil-export refuses it); use --mode hardened for data that leaves "
              "your hands", file=sys.stderr, flush=True)


def _key_notice(plan: shards.Plan, quiet: bool) -> None:
    if plan.key_created or not quiet:
        state = "created a new key in" if plan.key_created else "key from"
        print(f"{PROG}: {state} {plan.key_file} (fingerprint {_keys.key_fingerprint(plan.veil.key)}); "
              "keep it secret and with the data owner", file=sys.stderr, flush=True)


def _summary_line(out, seconds: float | None = None) -> str:
    m = shards.read_manifest(out)
    done = len(m["shards"])
    k = m.get("copies", 1)
    what = "images veiled" if k == 1 else f"veils ({k} per image)"
    skipped = f"{m['num_skipped']}" if k == 1 else f"{m['num_skipped'] // k} images ({m['num_skipped']} veils)"
    s = (f"{PROG}: {m['num_veiled']} {what} into {done}/{m['num_shards']} shards in {out}"
         f" ({skipped} skipped{', listed in manifest.json' if m['num_skipped'] else ''})")
    if seconds is not None:
        s += f" in {seconds:.1f} s"
    return s if m["complete"] else s + " - incomplete, rerun to finish"


def _size_problem(out) -> str | None:
    """More than half of SRC skipped as "size mismatch": the shards are not what the owner meant."""
    m = shards.read_manifest(out)
    n = sum(1 for sk in m["skipped"] if str(sk.get("reason", "")).startswith("size mismatch"))
    n //= m.get("copies", 1)  # each copy of a bad image is skipped
    total = m["source"].get("num_samples") or 0
    if not m["complete"] or n * 2 <= total:
        return None
    _, h, w = m["source"]["sample_shape"]
    return (f"{n} of {total} images were skipped for size mismatch (not {h}x{w}, the most common size): "
            "resize the images to one size before veil-shard; skipped files are listed in OUT/manifest.json")


def _spawn(args, argv: list[str]) -> int:
    """--nproc N: validate and create the key here, then run N rank processes and wait for them."""
    t0 = time.perf_counter()
    plan = _prepare(args, rank=0, world=1, local_rank=0)
    _source_warnings(plan, args.quiet)
    _mode_notice(args)
    _key_notice(plan, args.quiet)
    n = args.nproc
    threads = str(max(1, (os.cpu_count() or 1) // n))
    module = __spec__.name if __spec__ is not None and __spec__.name != "__main__" else "veil_transforms.tools.shard"
    cmd = [sys.executable, "-m", module, *argv, "--nproc", "1",
           "--key-file", str(plan.key_file)]
    procs = []
    try:
        for r in range(n):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                       _VEIL_SHARD_CHILD="1", _VEIL_SHARD_PARENT=str(os.getpid()))
            if not args.threads:
                env.setdefault("OMP_NUM_THREADS", threads)
            for k in ("MASTER_ADDR", "MASTER_PORT"):  # the ranks coordinate through the manifest lock
                env.pop(k, None)
            procs.append(subprocess.Popen(cmd, env=env))
        failed = 0  # the first failed rank's return code (negative: killed by that signal)
        while procs and failed == 0:
            for pr in list(procs):
                rc = pr.poll()
                if rc is None:
                    continue
                procs.remove(pr)
                failed = failed or rc
            time.sleep(0.05)
        if failed:
            how = f"exit {failed}" if failed > 0 else f"killed by {_signal_name(-failed)}"
            hint = (" (SIGKILL: often the out-of-memory killer; try a smaller --batch-size)"
                    if failed == -signal.SIGKILL else "")
            print(f"{PROG}: error: a rank failed ({how}){hint}; rerun the same command to resume",
                  file=sys.stderr, flush=True)
            return failed if failed > 0 else 1  # not a negative status (sys.exit would make it 247)
    finally:
        for pr in procs:  # only our own children
            if pr.poll() is None:
                pr.terminate()
        for pr in procs:
            try:
                pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pr.kill()
    line = _summary_line(plan.out, time.perf_counter() - t0)
    print(line, flush=True)
    problem = _size_problem(plan.out)
    if problem:
        return fail(PROG, problem, 1)
    return 0 if shards.read_manifest(plan.out)["complete"] else 1


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _init_dist(world: int) -> bool:
    """Join torchrun's process group (gloo) for the final barrier; the work itself needs none."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    rank, world, local_rank = _dist_env()
    child = os.environ.get("_VEIL_SHARD_CHILD") == "1"
    if child and os.environ.get("_VEIL_SHARD_PARENT", "").isdigit():  # a rank process of --nproc:
        shards._exit_with_parent(int(os.environ["_VEIL_SHARD_PARENT"]))  # not left writing after kill -9
    if args.nproc < 1:
        return fail(PROG, f"--nproc must be >= 1, got {args.nproc}")
    if args.threads < 0:
        return fail(PROG, f"--threads must be >= 0, got {args.threads}")
    problem = _device_problem(args.device)
    if problem:
        return fail(PROG, problem)
    dist = False
    t0 = time.perf_counter()
    threads = contextlib.ExitStack()
    try:
        threads.enter_context(torch_threads(args.threads))
        if args.nproc > 1 and world == 1:
            return _spawn(args, argv)
        dist = _init_dist(world)
        plan = _prepare(args, rank=rank, world=world, local_rank=local_rank)
        if rank == 0 and not child:
            _source_warnings(plan, args.quiet)
            _mode_notice(args)
            _key_notice(plan, args.quiet)
        shards.run(plan, rank=rank, world_size=world, batch_size=args.batch_size,
                             io_workers=args.io_workers, io_procs=args.io_procs, progress=not args.quiet,
                             recheck_source=args.recheck_source)
        if dist:
            import torch.distributed as tdist

            tdist.barrier()
    except shards.ShardError as e:
        return fail(PROG, e, 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, unless VEIL_DEBUG
        if debug():
            raise
        full = disk_full(e)
        if full is not None:
            where = full.filename or Path(args.out).absolute()  # (a write's error names no file: OUT's, mostly)
            return fail(PROG, f"the disk of {where} is full ({full.strerror}): free space and rerun the same command "
                              "to resume (the shards finished so far are kept)", 1)
        return fail(PROG, f"{type(e).__name__}: {e} (rerun the same command to resume)", 1)
    finally:
        threads.close()
        if dist:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()
    if child or rank != 0:
        return 0
    print(_summary_line(plan.out, time.perf_counter() - t0), flush=True)
    problem = _size_problem(plan.out)
    if problem:
        return fail(PROG, problem, 1)
    complete = shards.read_manifest(plan.out)["complete"]
    return 0 if complete or (world > 1 and not dist) else 1


if __name__ == "__main__":
    sys.exit(main())
