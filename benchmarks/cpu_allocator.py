"""CPU time of the veil loop with glibc's default allocator against ``tune_cpu_allocator()``.

    python benchmarks/cpu_allocator.py            # about 4 minutes on 2 shared cores

Each (case, allocator) runs in a fresh process (the allocator setting is process-wide and a heap's
history changes how often it page-faults), twice, in the order default, tuned, tuned, default. In a
process: one torch thread, a warm-up of each method, then ``--reps`` alternating runs of the plain
batched loop (``throughput.plain_batched``) and the library's ``veil`` on the same inputs (random
weights, random uint8 images, early stop off, T = ``--steps``). Reported per run: user and kernel CPU
seconds and minor page faults (``getrusage``), medians over the runs of both processes.
With ``--mnist N`` (and ../shared/data/mnist present) also a real run: the library's keyed veil of
the first N MNIST images with a LeNet-5 trained on the first 8,000 (10 epochs, seed 1234, as in
tests/test_mnist.py), T = 300 and the early stop at 0.3, once per process (trained once, in this
process, and handed to the children as a file).
Writes ``benchmarks/results/cpu_allocator.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# case -> (sample shape, batch, steps)
# (lenet5_28: the size of the CPU check in tests/test_fastpath.py; lenet5_28_b512: veil()'s CPU chunk)
CASES = {"lenet5_28": ((1, 28, 28), 256, 20), "lenet5_28_b512": ((1, 28, 28), 512, 10),
         "resnet18_32": ((3, 32, 32), 16, 5)}
ORDER = ("default", "tuned", "tuned", "default")
MNIST = "lenet5_mnist_trained"


def set_allocator(allocator: str) -> None:
    """In a fresh child, before torch is imported: tune glibc's allocator, or keep veil() from doing so."""
    from veil_transforms import allocator as A

    if allocator == "tuned":
        assert A.tune_cpu_allocator(), "not glibc: nothing to compare"
    else:
        os.environ[A.ENV] = "0"  # veil() would tune it on its first CPU call


def check_allocator(allocator: str) -> None:
    from veil_transforms import allocator as A

    assert (A._TUNED is not None) == (allocator == "tuned"), (allocator, A._TUNED)


def measure(fn, into: dict) -> None:
    """Run fn once; append its user and kernel CPU seconds, minor page faults and wall seconds."""
    a, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    b, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t
    for k, v in (("user", b.ru_utime - a.ru_utime), ("sys", b.ru_stime - a.ru_stime),
                 ("faults", b.ru_minflt - a.ru_minflt), ("wall", t)):
        into.setdefault(k, []).append(v)


def child(case: str, allocator: str, reps: int) -> dict:
    """Runs in a fresh process: time the plain loop and the library under one allocator setting."""
    set_allocator(allocator)
    import torch
    import torchvision

    sys.path.insert(0, str(HERE))
    import throughput as bench

    from veil_transforms import functional as F
    from veil_transforms.nets import LeNet5

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape, batch, steps = CASES[case]
    model = (LeNet5(1, 10) if case.startswith("lenet5") else torchvision.models.resnet18(num_classes=10)).eval()
    images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    xn = F.normalize(images)
    x0 = F.random_pixel_flip(xn, 0.5, torch.Generator().manual_seed(0))
    runs = {
        "plain": lambda: bench.plain_batched(model, x0, xn, steps, -math.inf),
        "library": lambda: F.veil(model, images, generator=torch.Generator().manual_seed(0), steps=steps,
                                  threshold=-math.inf, device="cpu"),
    }
    for f in runs.values():
        f()
    out = {k: {} for k in runs}
    for i in range(reps):
        for k, f in (runs.items() if i % 2 == 0 else reversed(runs.items())):
            measure(f, out[k])
    check_allocator(allocator)
    return out


def child_mnist(allocator: str, n: int, model_file: str) -> dict:
    """A real veil in a fresh process: the first n MNIST images, trained LeNet-5, paper defaults."""
    set_allocator(allocator)
    import torch

    from veil_transforms import functional as F
    from veil_transforms.data import load_mnist
    from veil_transforms.nets import LeNet5

    torch.set_num_threads(1)
    model = LeNet5()
    model.load_state_dict(torch.load(model_file))
    x = load_mnist()[0][:n]
    out: dict = {}
    measure(lambda: F.veil(model.eval(), x, key=b"cpu-allocator-benchmark-key-0001", device="cpu"), out)
    check_allocator(allocator)
    return {"library": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--reps", type=int, default=5, help="runs of each method per process")
    ap.add_argument("--mnist", type=int, default=0, metavar="N",
                    help="also veil the first N MNIST images with a trained LeNet-5 (0: skip)")
    ap.add_argument("--out-name", default="cpu_allocator")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "ALLOCATOR"), help=argparse.SUPPRESS)
    ap.add_argument("--model-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        case, allocator = args.child
        got = child_mnist(allocator, args.mnist, args.model_file) if case == MNIST else child(case, allocator, args.reps)
        print(json.dumps(got))
        return 0
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.mnist < 0 or args.mnist > 8000:
        ap.error(f"--mnist must be in [0, 8000], got {args.mnist}")
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        ap.error("needs Linux with glibc (the setting measured is glibc's)")
    cases, extra = list(args.cases), []
    if args.mnist:
        from veil_transforms.data import mnist_path

        if mnist_path() is None:
            ap.error("--mnist needs ../shared/data/mnist")
        extra = ["--mnist", str(args.mnist), "--model-file", train_mnist_model()]
        cases.append(MNIST)
    runs: dict = {}
    for case in cases:
        for allocator in ORDER:
            print(f"{case}: {allocator} allocator ...", file=sys.stderr, flush=True)
            p = subprocess.run([sys.executable, __file__, "--reps", str(args.reps), "--child", case, allocator, *extra],
                               capture_output=True, text=True, check=False)
            if p.returncode:
                sys.stderr.write(p.stderr)
                return p.returncode
            got = json.loads(p.stdout.strip().splitlines()[-1])
            for method, series in got.items():
                acc = runs.setdefault(case, {}).setdefault(allocator, {}).setdefault(method, {})
                for k, v in series.items():
                    acc.setdefault(k, []).extend(v)
    result = summarize(runs, args)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.out_name}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / f"{args.out_name}.md").write_text(md)
    print(md)
    return 0


def train_mnist_model() -> str:
    """LeNet-5 trained as tests/test_mnist.py trains its local model; saved to a temporary file."""
    import atexit
    import tempfile

    import torch

    from veil_transforms.data import load_mnist
    from veil_transforms.nets import LeNet5
    from veil_transforms.training import fit

    torch.set_num_threads(1)
    x, y = load_mnist()
    print("training the MNIST LeNet-5 ...", file=sys.stderr, flush=True)
    model = fit(LeNet5(), x[:8000], y[:8000], epochs=10, seed=1234)
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    atexit.register(os.unlink, path)
    torch.save(model.state_dict(), path)
    return path


def summarize(runs: dict, args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import throughput as bench

    rows = []
    for case, by_alloc in runs.items():
        shape, batch, steps = CASES[case] if case in CASES else ((1, 28, 28), args.mnist, 300)
        for allocator in ("default", "tuned"):
            for method, s in by_alloc[allocator].items():
                med = {k: statistics.median(v) for k, v in s.items()}
                rows.append({"case": case, "batch": batch, "steps": steps, "allocator": allocator, "method": method,
                             "user_s": med["user"], "sys_s": med["sys"], "cpu_s": statistics.median(
                                 [u + k for u, k in zip(s["user"], s["sys"])]),
                             "faults": med["faults"], "wall_s": med["wall"], "runs": len(s["user"])})
    torch.set_num_threads(1)
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + list(sys.argv[1:]))
    return {"command": cmd, "device_name": bench.device_name(torch.device("cpu")), "torch": torch.__version__,
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# CPU allocator: glibc default vs tune_cpu_allocator() on {result['device_name']}", "",
             f"`{result['command']}` (torch {result['torch']}; medians over the runs of two fresh processes per "
             "allocator; early stop off)", "",
             "| case | allocator | method | user s | kernel s | CPU s | minor faults | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} b{r['batch']} T={r['steps']} | {r['allocator']} | {r['method']} | "
                     f"{r['user_s']:.3f} | {r['sys_s']:.3f} | {r['cpu_s']:.3f} | {r['faults']:.0f} | {r['wall_s']:.3f} |")
    lines += ["", "Library / plain CPU time (median CPU s):", ""]
    by = {(r["case"], r["allocator"], r["method"]): r for r in result["rows"]}
    for case in dict.fromkeys(r["case"] for r in result["rows"]):
        if (case, "default", "plain") not in by:  # the real MNIST run: the library only
            d, t = by[(case, "default", "library")], by[(case, "tuned", "library")]
            lines.append(f"- {case} (keyed veil of {d['batch']} MNIST images, T = 300, early stop at 0.3), tuned / "
                         f"default CPU time: {t['cpu_s'] / d['cpu_s']:.2f} ({t['cpu_s']:.1f} s against "
                         f"{d['cpu_s']:.1f} s; wall {t['wall_s']:.1f} s against {d['wall_s']:.1f} s)")
            continue
        for allocator in ("default", "tuned"):
            lib, plain = by[(case, allocator, "library")], by[(case, allocator, "plain")]
            lines.append(f"- {case}, {allocator}: {lib['cpu_s'] / plain['cpu_s']:.2f} "
                         f"(library {lib['cpu_s']:.3f} s, plain {plain['cpu_s']:.3f} s)")
        d, t = by[(case, "default", "library")], by[(case, "tuned", "library")]
        lines.append(f"- {case}, library, tuned / default CPU time: {t['cpu_s'] / d['cpu_s']:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
