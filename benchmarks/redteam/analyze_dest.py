"""Third-party view: read ONLY DEST (tar shards + receipt). Ground truth (private map, originals,
truth.json) is loaded only to SCORE the features. Usage: python analyze_dest.py ROOT"""
import sys, csv, json, tarfile, glob, hashlib, collections, io
from pathlib import Path
import numpy as np, PIL.Image
from scipy.stats import spearmanr
root = Path(sys.argv[1])
# ---- third party: DEST only
recs = []
for f in sorted(glob.glob(str(root / "dest" / "*.tar"))):
    for m in tarfile.open(f):
        pass
    t = tarfile.open(f); cur = {}
    for m in t:
        k, ext = m.name.split(".", 1)
        d = t.extractfile(m).read()
        cur.setdefault(k, {"key": k, "shard": Path(f).name, "pos": len(recs)})
        cur[k][ext] = d; cur[k][ext + "_size"] = m.size; cur[k]["mtime"] = m.mtime
        cur[k]["uname"] = (m.uname, m.gname, m.uid, m.gid, m.mode)
        if ext == "png": recs.append(cur.pop(k))
N = len(recs)
V = np.stack([np.asarray(PIL.Image.open(io.BytesIO(r["png"])), dtype=np.float64) for r in recs])
lab = np.array([int(r["cls"]) for r in recs])
print("N", N, "distinct tar meta", set(r["uname"] for r in recs), set(r["mtime"] for r in recs))
print("png sizes", collections.Counter(r["png_size"] for r in recs).most_common(5))
chunks = collections.Counter()
for r in recs:
    b = r["png"]; i = 8
    while i < len(b):
        L = int.from_bytes(b[i:i+4], "big"); chunks[b[i+4:i+8]] += 1; i += 12 + L
print("png chunks", chunks)
h = collections.Counter(hashlib.sha256(r["png"]).hexdigest() for r in recs)
dupgroups = [k for k, c in h.items() if c > 1]
print("byte-identical veil groups:", len(dupgroups), "sizes", [h[k] for k in dupgroups])
# ---- ground truth (for scoring only)
pm = {row["opaque_key"]: row for row in csv.DictReader(open(root / "shards.private-map.csv"))}
truth = {t["rel"]: t for t in json.load(open(root / "truth.json"))}
rel = [pm[r["key"]]["path"] for r in recs]; cp = np.array([int(pm[r["key"]]["copy"]) for r in recs])
X = np.stack([np.asarray(PIL.Image.open(root / "src" / p), dtype=np.float64) for p in rel])
src = np.array([truth[p]["src"] for p in rel]); kind = [truth[p]["kind"] for p in rel]
# which originals are the identical-veil groups?
for k in dupgroups:
    idx = [i for i, r in enumerate(recs) if hashlib.sha256(r["png"]).hexdigest() == k]
    print("  identical veils ->", [(rel[i], cp[i]) for i in idx])
nd = sum(1 for k in kind if k == "dup") ; print("exact-dup originals (x copies):", nd)
# near-dup: best correlation of each near-dup veil with its source's same-copy veil vs others
def z(a): a = a.reshape(len(a), -1); a = a - a.mean(1, keepdims=True); return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-9)
Z = z(V); C = Z @ Z.T; np.fill_diagonal(C, -1)
pos = {(rel[i], cp[i]): i for i in range(N)}
near = [i for i in range(N) if kind[i] == "near"]
hits = []
for i in near:
    tgt = [j for j in range(N) if src[j] == src[i] and kind[j] == "orig" and cp[j] == cp[i]][0]
    hits.append(np.argmax(C[i]) == tgt)
if near: print("near-dup veil: nearest veil (corr) is its source's veil:", np.mean(hits), "of", len(hits), "chance", 1/N)
if near: print("corr near-dup vs own source veil:", np.mean([C[i, [j for j in range(N) if src[j]==src[i] and kind[j]=='orig' and cp[j]==cp[i]][0]] for i in near]))
# copy linkability by content (beyond documented order): nearest-neighbour of each veil among other-copy veils
Nimg = N // (cp.max() + 1)
if cp.max() > 0:
    same = []
    for i in range(N):
        others = [j for j in range(N) if cp[j] != cp[i]]
        j = others[int(np.argmax(C[i, others]))]
        same.append(src[j] == src[i] and kind[j] == kind[i])
    print("copy linking by correlation: top-1", np.mean(same), "chance ~", cp.max() / (N - Nimg))
# order: does position within copy block correlate with file order / mtime?
posn = np.arange(N) % Nimg
o = [i for i in range(N) if cp[i] == 0]
mt = np.array([truth[rel[i]]["mtime"] for i in o]); alpha = np.argsort(np.argsort([rel[i] for i in o]))
print("copy-major order check: copy index by block", [np.unique(cp[b*Nimg:(b+1)*Nimg]).tolist() for b in range(cp.max() + 1)])
print("same keyed order in each copy block:", all(rel[i] == rel[i + b*Nimg] for i in range(Nimg) for b in range(cp.max() + 1)))
print("spearman(position, mtime)", spearmanr(posn[o], mt)[0], " (position, alphabetical rank)", spearmanr(posn[o], alpha)[0])
# ---- pixel statistics of veils vs original content
def feats_v(v):
    f = v.reshape(len(v), -1)
    return dict(mean=f.mean(1), std=f.std(1), frac0=(f == 0).mean(1), frac255=(f == 255).mean(1),
                ac_h=np.array([np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1] for a in v]),
                ac_v=np.array([np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1] for a in v]),
                absdev=np.abs(f - 127.5).mean(1))
def ent(a):
    p = np.bincount(a.astype(int).ravel(), minlength=256) / a.size; p = p[p > 0]; return -(p * np.log2(p)).sum()
fo = dict(brightness=X.reshape(N, -1).mean(1), contrast=X.reshape(N, -1).std(1),
          entropy=np.array([ent(a) for a in X]), tv=np.abs(np.diff(X, axis=1)).mean((1, 2)) + np.abs(np.diff(X, axis=2)).mean((1, 2)))
fv = feats_v(V)
# PNG byte size (a deterministic function of the veil's pixels) against the original's compressibility
size = np.array([r["png_size"] for r in recs], dtype=np.float64)
def png_bytes(a):
    b = io.BytesIO(); PIL.Image.fromarray(a.astype(np.uint8)).save(b, "PNG", optimize=True); return len(b.getvalue())
if size.std() > 0:
    o_png = np.array([png_bytes(a) for a in X])
    print("\nveil PNG bytes: min %d max %d; Spearman with the original's PNG bytes %+.3f, total variation %+.3f; "
          "within class %s" % (size.min(), size.max(), spearmanr(size, o_png)[0], spearmanr(size, fo["tv"])[0],
                               " ".join("%+.3f" % spearmanr(size[lab == c], o_png[lab == c])[0] for c in np.unique(lab))))
else:
    print("\nveil PNG bytes: all %d (one size: nothing to correlate)" % size[0])
print("\nSpearman(veil feature, original feature) within class (n per class), |rho|>0.2 flagged")
for c in np.unique(lab):
    m = lab == c
    for a, va in fv.items():
        row = []
        for b, vb in fo.items():
            r, pval = spearmanr(va[m], vb[m]); row.append(f"{b}={r:+.3f}{'*' if pval < 0.001 else ''}")
        print(f" cls {c} n={m.sum()} {a:8s}", " ".join(row))
# raw pixel: does x~ correlate pixelwise with x? (mean over images of per-image corr), and the pixel-mean map
pc = np.array([np.corrcoef(X[i].ravel(), V[i].ravel())[0, 1] for i in range(N)])
print("\nper-image corr(x, x~): mean %.4f sd %.4f" % (pc.mean(), pc.std()))
np.savez(root / "feats.npz", V=V, X=X, lab=lab, cp=cp, src=src, **{"v_" + k: v for k, v in fv.items()}, **{"o_" + k: v for k, v in fo.items()})
