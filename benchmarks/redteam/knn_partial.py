"""Is the veil-statistic <-> contrast link explained by F(x) (nonparametrically)? kNN in logit space.
Usage: python knn_partial.py ROOT"""
import sys; from pathlib import Path
import numpy as np, torch; from scipy.stats import spearmanr
root = Path(sys.argv[1]); d = np.load(root / "feats.npz"); K = d["cp"].max() + 1; n = len(d["V"]) // K
X = d["X"][:n]; lab = d["lab"][:n]
F = torch.jit.load(str(root / "local.pt")).eval()
with torch.no_grad(): L = F(torch.from_numpy(X[:, None] / 127.5 - 1).float()).numpy()
f0 = d["v_frac0"].reshape(K, n).mean(0) + d["v_frac255"].reshape(K, n).mean(0); con = X.reshape(n, -1).std(1)
for c in (0, 1):
    m = np.where(lab == c)[0]; Lm = L[m]
    D = ((Lm[:, None] - Lm[None]) ** 2).sum(-1); np.fill_diagonal(D, np.inf)
    nn = np.argsort(D, 1)[:, :5]
    r1 = f0[m] - f0[m][nn].mean(1); r2 = con[m] - con[m][nn].mean(1)
    print(f"class {c}: rho(sat, contrast)={spearmanr(f0[m], con[m])[0]:+.3f}  rho(sat, |F|)={spearmanr(f0[m], np.abs(Lm).sum(1))[0]:+.3f}"
          f"  kNN-partial rho(sat, contrast | F(x))={spearmanr(r1, r2)[0]:+.3f}  rho(sat resid, contrast)={spearmanr(r1, con[m])[0]:+.3f}")
