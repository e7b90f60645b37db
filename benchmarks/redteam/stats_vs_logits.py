"""Do veil pixel statistics predict original content within class, and is it all through F(x)?
Uses feats.npz from analyze_dest.py (veil features are computed from DEST only; originals/F for scoring).
Usage: python stats_vs_logits.py ROOT"""
import sys
from pathlib import Path
import numpy as np, torch
from scipy.stats import spearmanr

def cv_ridge(Z, t, lam=1.0, folds=5, seed=0):
    idx = np.random.default_rng(seed).permutation(len(t)); p = np.empty(len(t))
    for f in range(folds):
        te = idx[f::folds]; tr = np.setdiff1d(idx, te)
        mu, sd = Z[tr].mean(0), Z[tr].std(0) + 1e-9; A = np.c_[(Z[tr] - mu) / sd, np.ones(len(tr))]
        w = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ t[tr])
        p[te] = np.c_[(Z[te] - mu) / sd, np.ones(len(te))] @ w
    return p
def resid(Z, t):
    A = np.c_[Z, np.ones(len(t))]; return t - A @ np.linalg.lstsq(A, t, rcond=None)[0]
root = Path(sys.argv[1]); d = np.load(root / "feats.npz")
V, X, lab, cp, src = d["V"], d["X"], d["lab"], d["cp"], d["src"]
N = len(V); n = N // cp.max().__add__(1)
K = cp.max() + 1
F = torch.jit.load(str(root / "local.pt")).eval()
with torch.no_grad():
    L = F(torch.from_numpy(X[:, None] / 127.5 - 1).float()).numpy()
first = cp == 0
vf = ["v_std", "v_frac0", "v_frac255", "v_absdev", "v_mean", "v_ac_h", "v_ac_v"]
# average each feature over an image's K copies (sample i and i + n are copies: documented order)
A = {k: d[k].reshape(K, n).mean(0) for k in vf}
labn, Xn, Ln = lab[:n], X[:n], L[:n]
contrast = Xn.reshape(n, -1).std(1); bright = Xn.reshape(n, -1).mean(1)
margin = Ln[:, 1] - Ln[:, 0]; lnorm = np.abs(Ln).sum(1)
print(f"{n} originals x {K} copies")
for c in (0, 1):
    m = labn == c
    print(f"class {c} (n={m.sum()}):")
    for k in ("v_std", "v_frac0", "v_frac255"):
        print(f"  {k:10s} copy0: rho(contrast)={spearmanr(d[k][:n][m], contrast[m])[0]:+.3f}"
              f"  avg4: rho(contrast)={spearmanr(A[k][m], contrast[m])[0]:+.3f} rho(bright)={spearmanr(A[k][m], bright[m])[0]:+.3f}"
              f"  rho(|F(x)|_1)={spearmanr(A[k][m], lnorm[m])[0]:+.3f} rho(margin)={spearmanr(A[k][m], margin[m])[0]:+.3f}")
    print(f"  F(x) itself: rho(|F(x)|_1, contrast)={spearmanr(lnorm[m], contrast[m])[0]:+.3f}")
# regression: predict contrast (and brightness) from veil stats (5-fold CV) vs from F(x) logits vs both
Fv = np.stack([A[k] for k in vf], 1); FL = np.stack([Ln[:, 0], Ln[:, 1]], 1)
for tname, t in (("contrast", contrast), ("brightness", bright)):
    for c in (0, 1):
        m = labn == c
        out = []
        for name, Z in (("veil stats", Fv[m]), ("F(x) logits", FL[m]), ("both", np.c_[Fv[m], FL[m]])):
            p = cv_ridge(Z, t[m])
            out.append(f"{name}: rho={spearmanr(p, t[m])[0]:+.3f}")
        print(f"predict {tname} class {c}:", "; ".join(out))
# residual: veil stats vs contrast after regressing out F(x) logits (partial correlation)
for c in (0, 1):
    m = labn == c
    Z = np.c_[FL[m], FL[m] ** 2, FL[m, :1] * FL[m, 1:]]
    r1 = resid(Z, A["v_frac0"][m]); r2 = resid(Z, contrast[m])
    print(f"class {c}: partial rho(frac0 avg, contrast | quad(F(x))) = {spearmanr(r1, r2)[0]:+.3f}")
