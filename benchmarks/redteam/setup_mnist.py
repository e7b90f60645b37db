"""MNIST owner run: 300 test-set digits as ImageFolder, LeNet-5 F on 2000 others, hardened 75x4, export.
Usage: python setup_mnist.py ROOT"""
import json, os, shutil, subprocess, sys; from pathlib import Path
import torch, PIL.Image
from veil_transforms.data import load_mnist; from veil_transforms.nets import LeNet5; from veil_transforms.training import fit
root = Path(sys.argv[1]); shutil.rmtree(root, ignore_errors=True); root.mkdir(parents=True)
x, y = load_mnist(); torch.manual_seed(0)
F = fit(LeNet5(1, 10), x[2000:4000], y[2000:4000], epochs=10, seed=1); torch.jit.script(F).save(str(root / "local.pt"))
rows = []
for i in range(300):
    rel = f"{int(y[i])}/writer_{i:04d}.png"; p = root / "src" / rel; p.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(x[i, 0].numpy()).save(p); t = 1_600_000_000 + 60 * i; os.utime(p, (t, t))
    rows.append(dict(i=i, rel=rel, label=int(y[i]), mtime=t, kind="orig", src=i))
json.dump(rows, open(root / "truth.json", "w"))
b = Path(__file__).resolve().parent / "bin"
subprocess.run([str(b / "veil-shard"), str(root / "src"), str(root / "shards"), "--model", str(root / "local.pt"), "--mode", "hardened",
                "--steps", "75", "--copies", "4", "--device", "cpu", "--quiet", "--shard-size", "200"], check=True)
r = subprocess.run([str(b / "veil-export"), str(root / "shards"), str(root / "dest"), "--originals", str(root / "src"), "--quiet"])
if r.returncode: subprocess.run([str(b / "veil-export"), str(root / "shards"), str(root / "dest"), "--originals", str(root / "src"), "--quiet", "--force"], check=True)
