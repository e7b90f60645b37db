"""Two exports by the same owner with the same key file (README: "Keep the key secret and reuse it").
Export 2: a later SRC (first 150 of export 1's files renamed? no: kept; 50 dropped; 20 new), optionally a
retrained F. Third party links them with DEST1 + DEST2 only. Usage: python cross_export.py ROOT1 ROOT2 [--new-model]"""
import sys, csv, json, shutil, subprocess, tarfile, glob, hashlib
from pathlib import Path
import numpy as np, PIL.Image, torch
r1, r2 = Path(sys.argv[1]), Path(sys.argv[2]); newF = "--new-model" in sys.argv
shutil.rmtree(r2, ignore_errors=True); r2.mkdir(parents=True)
files = sorted(p.relative_to(r1 / "src") for p in (r1 / "src").rglob("*.png"))
rng = np.random.default_rng(1); keep = set(rng.choice(len(files), len(files) - 50, replace=False).tolist())
for i, f in enumerate(files):
    if i in keep:
        (r2 / "src" / f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(r1 / "src" / f, r2 / "src" / f)
for j in range(20):  # new photos: mirrored versions of old ones, new names
    f = files[j]; a = np.asarray(PIL.Image.open(r1 / "src" / f))[:, ::-1]
    PIL.Image.fromarray(np.ascontiguousarray(a)).save(r2 / "src" / f.parent / f"new_{j:03d}.png")
model = r1 / "local.pt"
if newF:
    from veil_transforms.data import load_lfw_faces; from veil_transforms.nets import LeNet5; from veil_transforms.training import fit
    x, y = load_lfw_faces(); torch.manual_seed(7); F = fit(LeNet5(1, 2), x, y, epochs=30, seed=7)
    torch.jit.script(F).save(str(r2 / "local.pt")); model = r2 / "local.pt"
b = Path(__file__).resolve().parent / "bin"
subprocess.run([str(b / "veil-shard"), str(r2 / "src"), str(r2 / "shards"), "--model", str(model), "--key-file", str(r1 / "shards.key"),
                "--mode", "hardened", "--steps", "75", "--copies", "4", "--device", "cpu", "--quiet", "--shard-size", "100"], check=True)
subprocess.run([str(b / "veil-export"), str(r2 / "shards"), str(r2 / "dest"), "--originals", str(r2 / "src"),
                "--key-file", str(r1 / "shards.key"), "--max-ssim", "0.2", "--max-attack-ssim", "0.35", "--quiet", "--force"], check=True)
# ---- third party: DEST1 and DEST2 only
def load(d):
    out = {}
    for f in sorted(glob.glob(str(d / "*.tar"))):
        t = tarfile.open(f)
        for m in t:
            if m.name.endswith(".png"): out[m.name[:-4]] = hashlib.sha256(t.extractfile(m).read()).hexdigest()
    return out, json.load(open(d / "receipt.json"))
d1, rc1 = load(r1 / "dest"); d2, rc2 = load(r2 / "dest")
print("fingerprints", rc1["key_fingerprint"], rc2["key_fingerprint"], "equal:", rc1["key_fingerprint"] == rc2["key_fingerprint"])
common = set(d1) & set(d2); same_px = sum(d1[k] == d2[k] for k in common)
h1 = {}; [h1.setdefault(h, []).append(k) for k, h in d1.items()]
px_links = sum(1 for k, h in d2.items() if h in h1)
print(f"export1 {len(d1)} veils, export2 {len(d2)} veils; shared opaque keys {len(common)}; of those byte-identical veils {same_px}; "
      f"export2 veils whose exact pixels occur in export1: {px_links}")
# ---- scoring: are the links right?
pm1 = {r["opaque_key"]: r["path"] for r in csv.DictReader(open(r1 / "shards.private-map.csv"))}
pm2 = {r["opaque_key"]: r["path"] for r in csv.DictReader(open(r2 / "shards.private-map.csv"))}
print("links correct (same file):", sum(pm1[k] == pm2[k] for k in common), "/", len(common),
      "; files in both sets x 4 copies =", 4 * len(set(pm1.values()) & set(pm2.values())))
