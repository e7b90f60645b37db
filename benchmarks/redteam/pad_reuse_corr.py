"""Same key, same file, RETRAINED F (cross_export.py --new-model): the pad (derived from key+image only)
is reused, so the two exports' veils of one file are pixel-correlated. Third party: DEST1 + DEST2 only.
Usage: python pad_reuse_corr.py ROOT1 ROOT2"""
import sys, io, tarfile, glob; from pathlib import Path; import numpy as np, PIL.Image
def load(d):
    out = {}
    for f in sorted(glob.glob(str(Path(d) / "*.tar"))):
        t = tarfile.open(f)
        for m in t:
            if m.name.endswith(".png"): out[m.name[:-4]] = np.asarray(PIL.Image.open(io.BytesIO(t.extractfile(m).read())), dtype=np.float64)
    return out
a, b = load(Path(sys.argv[1]) / "dest"), load(Path(sys.argv[2]) / "dest")
ka, kb = list(a), list(b)
def z(M): M = M.reshape(len(M), -1); M = M - M.mean(1, keepdims=True); return M / np.linalg.norm(M, axis=1, keepdims=True)
A, B = z(np.stack([a[k] for k in ka])), z(np.stack([b[k] for k in kb]))
C = B @ A.T
common = [i for i, k in enumerate(kb) if k in a]
pair = np.array([C[i, ka.index(kb[i])] for i in common])
other = C[common].copy(); [other.__setitem__((j, ka.index(kb[i])), np.nan) for j, i in enumerate(common)]
print(f"corr(veil in export2, same file's veil in export1): mean {pair.mean():.3f} min {pair.min():.3f} (n={len(pair)}); "
      f"vs other veils: mean {np.nanmean(other):.4f} max {np.nanmax(other):.3f}")
print("link by max correlation alone (ignoring keys) top-1:", np.mean([ka[int(np.argmax(C[i]))] == kb[i] for i in common]))
