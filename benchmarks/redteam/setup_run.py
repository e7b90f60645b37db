"""Build a realistic owner run: LFW subset as ImageFolder with person-like names, capture mtimes,
exact duplicates and near-duplicates; train LeNet-5 F; veil-shard hardened 75x4; veil-export.
Usage: python setup_run.py ROOT [--mode hardened] [--steps 75] [--copies 4] [--p 0.5] [--dups 10]"""
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path
import numpy as np, torch, PIL.Image
from veil_transforms.data import load_lfw_faces
from veil_transforms.nets import LeNet5
from veil_transforms.training import fit

ap = argparse.ArgumentParser()
ap.add_argument("root"); ap.add_argument("--steps", type=int, default=75); ap.add_argument("--copies", type=int, default=4)
ap.add_argument("--p", type=float, default=0.5); ap.add_argument("--dups", type=int, default=10)
ap.add_argument("--extra", nargs="*", default=[]); ap.add_argument("--mode", default="hardened")
a = ap.parse_args()
root = Path(a.root); shutil.rmtree(root, ignore_errors=True); root.mkdir(parents=True)
x, y = load_lfw_faces()
torch.manual_seed(0)
F = fit(LeNet5(1, 2), x, y, epochs=30, seed=1)
torch.jit.script(F).save(str(root / "local.pt"))
classes = {1: "faces", 0: "not_faces"}
rows = []
base_t = 1_600_000_000
rng = np.random.default_rng(0)
def save(img, rel, t):
    p = root / "src" / rel; p.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(img).save(p)   # PIL default PNG
    os.utime(p, (t, t))
for i in range(len(x)):
    lab = int(y[i]); img = x[i, 0].numpy()
    rel = f"{classes[lab]}/Person_{i // 4:03d}_{i % 4 + 1:04d}.png"
    t = base_t + i * 3600
    save(img, rel, t)
    rows.append(dict(i=i, rel=rel, label=lab, mtime=t, kind="orig", src=i))
# exact duplicates (different name) and near duplicates (one pixel +1)
for j in range(a.dups):
    i = int(rng.integers(0, len(x))); lab = int(y[i]); img = x[i, 0].numpy()
    rel = f"{classes[lab]}/zz_dup_{j:03d}.png"; save(img, rel, base_t + 10**7 + j)
    rows.append(dict(i=len(rows), rel=rel, label=lab, mtime=base_t + 10**7 + j, kind="dup", src=i))
    img2 = img.copy(); img2[12, 12] = min(255, int(img2[12, 12]) + 1)
    rel = f"{classes[lab]}/zz_near_{j:03d}.png"; save(img2, rel, base_t + 2 * 10**7 + j)
    rows.append(dict(i=len(rows), rel=rel, label=lab, mtime=base_t + 2 * 10**7 + j, kind="near", src=i))
json.dump(rows, open(root / "truth.json", "w"))
bin_ = Path(__file__).resolve().parent / "bin"  # a folder of links to the CLIs, else the installed ones
def tool(name):
    return [str(bin_ / name)] if (bin_ / name).exists() else [shutil.which(name) or sys.exit(f"{name} not installed")]
t0 = time.time()
cmd = [*tool("veil-shard"), str(root / "src"), str(root / "shards"), "--model", str(root / "local.pt"),
       "--mode", a.mode, "--steps", str(a.steps), "--copies", str(a.copies), "--p", str(a.p),
       "--device", "cpu", "--quiet", "--shard-size", "100"] + a.extra
print(" ".join(cmd)); r = subprocess.run(cmd); print("shard rc", r.returncode, time.time() - t0)
cmd = [*tool("veil-export"), str(root / "shards"), str(root / "dest"), "--originals", str(root / "src"),
       "--max-ssim", "0.2", "--max-attack-ssim", "0.35", "--quiet"]
r = subprocess.run(cmd); print("export rc", r.returncode, time.time() - t0)
if r.returncode == 1:
    r = subprocess.run(cmd + ["--force"]); print("export --force rc", r.returncode, time.time() - t0)
