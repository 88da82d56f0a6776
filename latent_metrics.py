"""
The latent-diffusability metrics of "Diffusing in the Right Space: A Systematic Study of Latent Diffusability"
(Zhong et al. 2026), as defined in docs/metrics.md (section numbers below are that
file's), for 1D token latents (B, L, C) and 2D grids (B, H*W, C), channel last. Every metric takes latents
normalised exactly as the denoiser sees them (per channel, train statistics) unless it says otherwise.

  VIV      velocity irreducible variance: class-wise Kronecker (tokens x channels) flip-flop covariance,
           VIV = (pi/2) tr(Sigma^1/2), VIV_norm, IV(t), and the Monte-Carlo marginal        (section 1)
  LNC      kNN label consistency (cosine, k = 10), foreground-pooled where masks exist       (2)
  spatial  LDS, CDS, SRSS, RMSC on a token grid (iREPA)                                      (3)
  SEC      DCT energy above a radius; for 1D tokens the token-covariance proxy              (4, 10)
  iFID     FD of decoded SLERP interpolations to train neighbours                           (5)
  uniform  t-SNE density CV / Gini / entropy (exact t-SNE written here, sklearn's defaults) (6)
  equivariance  rot90 / scale, on grids directly, on 1D tokens as a learned linear map      (7, 10)
  trajectories  local straightness, global efficiency, per-segment length ratio            (8)
  statistics    Pearson / Spearman, permutation p-values, partial r, Holm's correction, bootstrap intervals

Time here is nanotok's (t = 1 noise): IV(t) = sum lambda / (t^2 + (1 - t)^2 lambda), the notes' formula at 1 - t.
"""
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# VIV (section 1)


def _ridge_inv(A, eps=1e-6):
    n = A.shape[-1]
    return torch.linalg.inv(A + eps * torch.trace(A) / n * torch.eye(n, dtype=A.dtype, device=A.device))


def flip_flop(X, iters=50, tol=1e-6):
    """Matrix-normal MLE (Dutilleul 1999) of centred samples X (N, n, p): Sigma = U (n x n) kron V (p x p),
    rescaled so that tr V = p. Float64."""
    N, n, p = X.shape
    R = (X - X.mean(0)).double()
    U, V = torch.eye(n, dtype=torch.float64), torch.eye(p, dtype=torch.float64)
    for _ in range(iters):
        U_new = torch.einsum("aij,jk,alk->il", R, _ridge_inv(V), R) / (N * p)
        V_new = torch.einsum("aji,jk,akl->il", R, _ridge_inv(U_new), R) / (N * n)
        s = p / torch.trace(V_new)
        U_new, V_new = U_new / s, V_new * s
        done = all(torch.linalg.norm(a - b) <= tol * torch.linalg.norm(b) for a, b in ((U_new, U), (V_new, V)))
        U, V = U_new, V_new
        if done:
            break
    return U, V


def kron_eigs(U, V):
    """Eigenvalues (n, p) of U kron V: a_i b_j, negatives clipped to 0."""
    a, b = torch.linalg.eigvalsh(U).clamp_min(0), torch.linalg.eigvalsh(V).clamp_min(0)
    return a[:, None] * b[None, :]


def viv(z, y, iters=50):
    """Class-conditional VIV of latents z (N, T, C) with labels y: {'viv', 'viv_norm', 'per_class', 'eigs'}.
    VIV_c = (pi/2) sum_ij sqrt(a_i b_j) = (pi/2) tr(U^1/2) tr(V^1/2); VIV = mean over classes; VIV_norm =
    VIV / ((pi/2) D). Lower is better."""
    y = torch.as_tensor(y)
    eigs, per_class = {}, {}
    for c in sorted(torch.unique(y).tolist()):
        lam = kron_eigs(*flip_flop(z[y == c], iters))
        eigs[c] = lam
        per_class[c] = (math.pi / 2) * lam.sqrt().sum().item()
    v = float(np.mean(list(per_class.values())))
    D = z.shape[1] * z.shape[2]
    return {"viv": v, "viv_norm": v / (math.pi / 2 * D), "per_class": per_class, "eigs": eigs}


def iv_curve(eigs, ts):
    """IV(t) / D averaged over classes at our times ts (t = 1 noise: IV = mean eigenvalue; t = 0: 1)."""
    out = []
    for t in ts:
        vals = [(lam / (t ** 2 + (1 - t) ** 2 * lam)).mean().item() for lam in eigs.values()]
        out.append(float(np.mean(vals)))
    return out


def viv_marginal(z, y, iters=50, nodes=32, samples=512, seed=0):
    """Monte-Carlo VIV of the class mixture (section 1.4): each class a Gaussian with its flip-flop covariance,
    weights N_k / N; tr Var(v | x_t) from the exact mixture posterior, Gauss-Legendre in t. Normalised by
    (pi/2) D as VIV_norm. It is >= the class-conditional VIV: the excess is label ambiguity."""
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(y)
    classes = sorted(torch.unique(y).tolist())
    comps = []
    for c in classes:
        zc = z[y == c].double()
        U, V = flip_flop(zc, iters)
        a, P = torch.linalg.eigh(U)
        b, Q = torch.linalg.eigh(V)
        comps.append((zc.mean(0), P, Q, a.clamp_min(0)[:, None] * b.clamp_min(0)[None], len(zc) / len(z)))
    log_pi = torch.tensor([math.log(c[4]) for c in comps], dtype=torch.float64)
    tq, wq = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for t, w in zip((tq + 1) / 2, wq / 2):  # the notes' convention inside: x_t = (1 - t) noise + t data
        k = torch.multinomial(log_pi.exp(), samples, replacement=True, generator=g)
        G = torch.randn(samples, *z.shape[1:], generator=g, dtype=torch.float64)
        x1 = torch.stack([comps[i][0] + comps[i][1] @ (comps[i][3].sqrt() * G[s]) @ comps[i][2].T
                          for s, i in enumerate(k.tolist())])
        xt = (1 - t) * torch.randn(x1.shape, generator=g, dtype=torch.float64) + t * x1
        logw, ubar, tau = [], [], []
        for (M, P, Q, lam, _), lp in zip(comps, log_pi):
            r = P.T @ (xt - t * M) @ Q                                      # (S, n, p) eigen-coordinates
            m, gk = (1 - t) ** 2 + t ** 2 * lam, t * lam - (1 - t)
            logw.append(lp - 0.5 * (r ** 2 / m).sum((1, 2)) - 0.5 * torch.log(m).sum())
            ubar.append(M + P @ (gk / m * r) @ Q.T)
            tau.append((lam / m).sum())
        wk = torch.softmax(torch.stack(logw, 1), dim=1)                    # (S, K)
        ubar = torch.stack(ubar, 1)                                         # (S, K, n, p)
        second = (wk * (torch.stack(tau)[None] + ubar.pow(2).sum((2, 3)))).sum(1)
        mean = (wk[..., None, None] * ubar).sum(1)
        total += w * (second - mean.pow(2).sum((1, 2))).mean().item()
    D = z.shape[1] * z.shape[2]
    return {"viv_marginal": total, "viv_marginal_norm": total / (math.pi / 2 * D)}


# ----------------------------------------------------------------------------------------------------------
# semantic separability (section 2)

def lnc(f, y, k=10, device=None, block=2048):
    """Mean fraction of the k cosine-nearest other samples that share the label: 1 for separated classes,
    about 1 / #classes for none. f (N, d) descriptors. Rows in blocks (block x N similarities at a time: 0.8 GB
    at N = 50K, where the dense N x N float64 matrix is 20 GB), on `device` if given."""
    f = F.normalize(f.double().flatten(1), dim=1).to(device or f.device)
    y = torch.as_tensor(y).to(f.device)
    hits = torch.zeros((), dtype=torch.float64, device=f.device)
    for i in range(0, len(f), block):
        sim = f[i:i + block] @ f.T                                           # (b, N)
        rows = torch.arange(len(sim), device=f.device)
        sim[rows, rows + i] = -float("inf")                                  # not its own neighbour
        nn_idx = sim.topk(k, dim=1).indices                                  # (b, k)
        hits += (y[nn_idx] == y[i:i + block, None]).double().sum()
    return (hits / (len(f) * k)).item()


def fg_pool(u, fg):
    """Masked mean over foreground tokens: u (N, T, C), fg (N, T) bool -> (N, C); rows with no FG dropped."""
    keep = fg.any(1)
    m = fg[keep].double().unsqueeze(-1)
    return (u[keep].double() * m).sum(1) / m.sum(1), keep


# ----------------------------------------------------------------------------------------------------------
# linear probe and MAETok's GMM analysis (sections 2 and 9)

def linear_probe(z_train, y_train, z_test, y_test, steps=300, weight_decay=1e-4):
    """Multinomial logistic regression (L-BFGS, full batch) on flattened latents standardized with the
    training statistics; returns the test accuracy."""
    z_train, z_test = z_train.flatten(1).double(), z_test.flatten(1).double()
    mu, sd = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    a, b = (z_train - mu) / sd, (z_test - mu) / sd
    K = int(max(y_train.max(), y_test.max())) + 1
    W = torch.zeros(a.shape[1], K, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, c], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ W + c, y_train) + weight_decay * (W * W).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return ((b @ W + c).argmax(1) == y_test).double().mean().item()


def pca_dim(z, var=0.9):
    """Smallest number of principal components explaining >= var of the variance."""
    s = torch.linalg.svdvals(z.double() - z.double().mean(0))
    ratio = (s ** 2).cumsum(0) / (s ** 2).sum()
    return int((ratio < var).sum().item()) + 1


def pca_standardize(z, dim, *held_out):
    """Project centred z (N, D) on its top `dim` principal axes, then standardize each axis; held-out sets go
    through the same map (fitted on z). Returns the projected z, or a list [z, *held_out]."""
    mu = z.double().mean(0)
    _, _, V = torch.linalg.svd(z.double() - mu, full_matrices=False)
    proj = lambda a: (a.double() - mu) @ V[:dim].T
    sd = proj(z).std(0).clamp_min(1e-12)
    out = [proj(a) / sd for a in (z, *held_out)]
    return out if held_out else out[0]


def gmm_nll(x, K, iters=200, seed=0, tol=1e-6, x_test=None):
    """Diagonal-covariance Gaussian mixture fitted by EM (k-means++-style init) on x (N, d); returns the mean
    negative log-likelihood per sample (nats) of x_test (held out) or, without it, of x itself."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    N, d = x.shape
    centers = [x[torch.randint(N, (1,), generator=g)]]
    for _ in range(K - 1):  # k-means++ seeding: spread the initial means
        d2 = torch.cdist(x, torch.cat(centers)).min(1).values ** 2
        centers.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)])
    mu, var, logw = torch.cat(centers), x.var(0).expand(K, d).clone(), torch.full((K,), -math.log(K), dtype=x.dtype)
    prev = float("inf")
    for _ in range(iters):
        logp = (-0.5 * (((x[:, None] - mu) ** 2) / var + var.log() + math.log(2 * math.pi)).sum(-1)) + logw  # (N, K)
        ll = torch.logsumexp(logp, dim=1)
        nll = -ll.mean().item()
        r = (logp - ll[:, None]).exp()                                      # responsibilities (N, K)
        nk = r.sum(0) + 1e-10
        mu = (r.T @ x) / nk[:, None]
        var = (r.T @ x ** 2) / nk[:, None] - mu ** 2 + 1e-6
        logw = (nk / N).log()
        if prev - nll < tol:
            break
        prev = nll
    if x_test is None:
        return nll
    xt = x_test.double()
    logp = (-0.5 * (((xt[:, None] - mu) ** 2) / var + var.log() + math.log(2 * math.pi)).sum(-1)) + logw
    return -torch.logsumexp(logp, dim=1).mean().item()


# ----------------------------------------------------------------------------------------------------------
# spatial structure (section 3), on tokens with integer grid positions

def grid_coords(h, w):
    i = torch.arange(h * w)
    return torch.stack([i // w, i % w], 1)                                   # (T, 2) row-major


def spatial_metrics(u, pos, fg=None, far=6, dmax=8, d_pos=1, d_neg=6):
    """LDS, CDS, RMSC (and SRSS with a foreground mask fg (N, T)) of tokens u (N, T, C) at positions pos (T, 2),
    per image then averaged (SRSS: nanmean). Manhattan distance; cosine similarity. Higher is better."""
    uh = F.normalize(u.double(), dim=-1)
    K = uh @ uh.mT                                                            # (N, T, T)
    d = (pos[:, None, :] - pos[None, :, :]).abs().sum(-1)                    # (T, T)
    off = ~torch.eye(len(pos), dtype=torch.bool)
    lds = K[:, d == 1].mean(1) - K[:, (d >= far) & off].mean(1)
    ds = [dd for dd in range(1, dmax + 1) if (d == dd).any()]
    s = torch.stack([K[:, d == dd].mean(1) for dd in ds], 1)                 # (N, len(ds))
    x = torch.tensor(ds, dtype=torch.float64)
    slope = ((x - x.mean()) * (s - s.mean(1, keepdim=True))).sum(1) / ((x - x.mean()) ** 2).sum()
    out = {"lds": lds.mean().item(), "cds": (-slope).mean().item(), "rmsc": rmsc(u)}
    if fg is not None:
        vals = []
        for Ki, m in zip(K, fg):
            if m.sum() < 2 or (~m).sum() < 1:
                vals.append(float("nan"))
                continue
            pos_m = (d == d_pos)[m][:, m] if d_pos == 1 else ((d >= 1) & (d <= d_pos))[m][:, m]
            neg_m = (d >= d_neg)[m][:, ~m]
            Kp, Kn = Ki[m][:, m], Ki[m][:, ~m]
            ok = pos_m.any(1) & neg_m.any(1)
            if not ok.any():
                vals.append(float("nan"))
                continue
            p = (Kp * pos_m).sum(1)[ok] / pos_m.sum(1)[ok]
            n = (Kn * neg_m).sum(1)[ok] / neg_m.sum(1)[ok]
            vals.append((p - n).mean().item())
        out["srss"] = float(np.nanmean(vals)) if not all(map(math.isnan, vals)) else float("nan")
        out["srss_images"] = int(sum(not math.isnan(v) for v in vals))
    return out


def rmsc(u):
    """Token diversity sqrt(1 - |mean_t u_t / |u_t||^2) per image, averaged (needs no grid)."""
    uh = F.normalize(u.double(), dim=-1)
    return (1 - uh.mean(1).pow(2).sum(-1)).clamp_min(0).sqrt().mean().item()


# ----------------------------------------------------------------------------------------------------------
# spectral (section 4; the 1D proxy of section 10)

def dct_matrix(n):
    """Orthonormal DCT-II (n, n): F = D x."""
    k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    D = math.sqrt(2 / n) * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
    D[0] /= math.sqrt(2)
    return D


def sec(z, grid, taus=(0.25, 0.5, 0.75)):
    """Share of the mean DCT energy above Manhattan radius tau * r_max, per channel over the grid; z (N, H*W, C).
    Lower is smoother. White noise at 16 x 16 gives about 0.47 at tau 0.5."""
    H, W = grid
    x = z.double().mT.reshape(len(z), -1, H, W)                              # (N, C, H, W)
    Fz = dct_matrix(H) @ x @ dct_matrix(W).T
    E = Fz.pow(2).mean((0, 1))                                               # (H, W)
    r = torch.arange(H)[:, None] + torch.arange(W)[None]
    rmax = (H - 1) + (W - 1)
    return {f"sec_{t}": (E[r > t * rmax].sum() / E.sum()).item() for t in taus}


def sec_1d(eigs_token, taus=(0.25, 0.5, 0.75)):
    """The token-covariance proxy for 1D latents: share of the token-covariance spectrum (descending) past the
    first tau * L eigenvalues, from the class-averaged flip-flop token factor."""
    lam = torch.sort(eigs_token.clamp_min(0), descending=True).values
    L = len(lam)
    return {f"sec1d_{t}": (lam[int(t * L):].sum() / lam.sum()).item() for t in taus}


# ----------------------------------------------------------------------------------------------------------
# uniformity (section 6): exact t-SNE as sklearn's defaults (perplexity 30, 1000 iterations, PCA init,
# early exaggeration 12 for 250 iterations, learning rate max(N / 48, 50), momentum 0.5 -> 0.8, gains)

def _affinities(x, perplexity, tol=1e-5, steps=100):
    d2 = torch.cdist(x, x).pow(2)
    N = len(x)
    beta = torch.ones(N, dtype=x.dtype)
    lo, hi = torch.full_like(beta, -float("inf")), torch.full_like(beta, float("inf"))
    target = math.log(perplexity)
    eye = torch.eye(N, dtype=torch.bool)
    for _ in range(steps):
        P = torch.exp(-d2 * beta[:, None]).masked_fill(eye, 0)
        sP = P.sum(1).clamp_min(1e-12)
        H = torch.log(sP) + beta * (d2 * P).sum(1) / sP                     # entropy in nats
        diff = H - target
        if diff.abs().max() < tol:
            break
        up = diff > 0  # entropy too high -> increase beta
        lo = torch.where(up, beta, lo)
        hi = torch.where(up, hi, beta)
        beta = torch.where(up, torch.where(torch.isinf(hi), beta * 2, (beta + hi) / 2),
                           torch.where(torch.isinf(lo), beta / 2, (beta + lo) / 2))
    P = P / sP[:, None]
    return (P + P.T) / (2 * N)


def tsne(x, perplexity=30.0, iters=1000, seed=42):
    """2D exact t-SNE of x (N, d)."""
    x = x.double()
    N = len(x)
    P = _affinities(x, perplexity).clamp_min(1e-12)
    xc = x - x.mean(0)
    Y = torch.linalg.svd(xc, full_matrices=False)[0][:, :2] * torch.linalg.svd(xc, full_matrices=False)[1][:2]
    Y = Y / Y[:, 0].std() * 1e-4                                             # sklearn's PCA init scale
    torch.manual_seed(seed)
    lr = max(N / 12 / 4, 50)
    update, gains = torch.zeros_like(Y), torch.ones_like(Y)
    for it in range(iters):
        exag, mom = (12.0, 0.5) if it < 250 else (1.0, 0.8)
        num = 1 / (1 + torch.cdist(Y, Y).pow(2))
        num.fill_diagonal_(0)
        Q = num / num.sum()
        W = (exag * P - Q) * num
        grad = 4 * (W.sum(1, keepdim=True) * Y - W @ Y)
        same = (grad > 0) == (update > 0)
        gains = torch.where(same, gains * 0.8, gains + 0.2).clamp_min(0.01)
        update = mom * update - lr * gains * grad
        Y = Y + update
    return Y


def uniformity(points):
    """Density CV, Gini and normalised entropy of a Gaussian KDE (Scott) evaluated at the 2D points."""
    from scipy.stats import gaussian_kde
    p = points.double().numpy()
    rho = gaussian_kde(p.T)(p.T)
    N = len(rho)
    q = rho / rho.sum()
    srt = np.sort(rho)
    gini = float(((2 * np.arange(1, N + 1) - N - 1) * srt).sum() / (N * srt.sum()))
    return {"density_cv": float(rho.std() / rho.mean()), "gini": gini,
            "entropy": float(-(q * np.log2(q + 1e-10)).sum() / np.log2(N))}


def latent_uniformity(u, reps=3, seed=0, perplexity=30.0, iters=1000):
    """VA-VAE's tool: one random token per image (its C-vector), t-SNE, density statistics; mean over reps."""
    g = torch.Generator().manual_seed(seed)
    res = []
    for r in range(reps):
        pick = torch.randint(u.shape[1], (len(u),), generator=g)
        res.append(uniformity(tsne(u[torch.arange(len(u)), pick], perplexity, iters, seed=42 + r)))
    return {k: float(np.mean([x[k] for x in res])) for k in res[0]}


# ----------------------------------------------------------------------------------------------------------
# equivariance (section 7): T acts on images (B, 3, H, W) and on grid latents (B, h, w, C) alike

def rot90(x, k, latent=False):
    return torch.rot90(x, k, dims=(1, 2) if latent else (2, 3))


def zoom(x, s, latent=False):
    """The affine scale by 1/s at a fixed size: the centre s-crop resized back up (bilinear, no antialias)."""
    if latent:
        return zoom(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
    H, W = x.shape[-2:]
    h, w = round(H * s), round(W * s)
    i, j = (H - h) // 2, (W - w) // 2
    return F.interpolate(x[..., i:i + h, j:j + w], size=(H, W), mode="bilinear", align_corners=False)


TRANSFORMS = {"rot90": [(rot90, k) for k in (1, 2, 3)], "scale": [(zoom, s) for s in (0.5, 0.75)]}


def grid_equivariance(encode, x, grid):
    """Encoder-side errors of a grid tokenizer: E||E(Tx) - T(E(x))||^2 / E||T(E(x)) - mean||^2 and the mean
    per-token cosine, per transform family. encode(x) -> (B, H*W, C)."""
    h, w = grid
    z = encode(x).double().unflatten(1, (h, w))                              # (B, h, w, C)
    out = {}
    for name, ts in TRANSFORMS.items():
        err, cos = [], []
        for fn, a in ts:
            ref = fn(z, a, latent=True)
            got = encode(fn(x, a)).double().unflatten(1, (h, w))
            err.append(((got - ref) ** 2).mean().item() / ((ref - ref.mean((0, 1, 2))) ** 2).mean().item())
            cos.append(F.cosine_similarity(got, ref, dim=-1).mean().item())
        out[f"eq_err_{name}"], out[f"eq_cos_{name}"] = float(np.mean(err)), float(np.mean(cos))
    return out


def linear_equivariance(encode, x_train, x_test, ridge=1e-3):
    """For 1D tokens (section 10): T has no action on tokens, so fit one linear map A_T: E(x) -> E(Tx) on the
    train images (ridge) and report its held-out R^2 per transform family. Higher = more equivariant."""
    def feats(x):
        return encode(x).double().flatten(1)
    z_tr, z_te = feats(x_train), feats(x_test)
    mu = z_tr.mean(0)
    out = {}
    for name, ts in TRANSFORMS.items():
        r2 = []
        for fn, a in ts:
            t_tr, t_te = feats(fn(x_train, a)), feats(fn(x_test, a))
            A = torch.linalg.solve(
                (z_tr - mu).T @ (z_tr - mu) + ridge * len(z_tr) * torch.eye(z_tr.shape[1], dtype=torch.float64),
                (z_tr - mu).T @ (t_tr - t_tr.mean(0)))
            pred = (z_te - mu) @ A + t_tr.mean(0)
            r2.append(1 - ((t_te - pred) ** 2).sum().item() / ((t_te - t_te.mean(0)) ** 2).sum().item())
        out[f"eq_linear_r2_{name}"] = float(np.mean(r2))
    return out


# ----------------------------------------------------------------------------------------------------------
# iFID (section 5): SLERP to a train neighbour, decode, FD to the real images

def slerp(a, b, alpha=0.5):
    """On flattened vectors: angle from the unit vectors, weights applied to the raw vectors; linear if sin ~ 0."""
    af, bf = a.flatten(1).double(), b.flatten(1).double()
    cos = (F.normalize(af, dim=1) * F.normalize(bf, dim=1)).sum(1).clamp(-1, 1)
    th = torch.arccos(cos)
    s = torch.sin(th)
    lin = s < 1e-6
    wa = torch.where(lin, torch.full_like(s, 1 - alpha), torch.sin((1 - alpha) * th) / s.clamp_min(1e-12))
    wb = torch.where(lin, torch.full_like(s, alpha), torch.sin(alpha * th) / s.clamp_min(1e-12))
    return (wa[:, None] * af + wb[:, None] * bf).view_as(a).to(a.dtype)


def neighbours(z_query, z_db, k=10, generator=None):
    """Per query: the top-k train latents by cosine, one drawn with weights softmax(-MSE) (the reference code)."""
    q, db = z_query.flatten(1).float(), z_db.flatten(1).float()
    top = (F.normalize(q, dim=1) @ F.normalize(db, dim=1).T).topk(k, dim=1).indices   # (N, k)
    mse = ((db[top] - q[:, None]) ** 2).mean(-1)
    pick = torch.multinomial(torch.softmax(-mse, dim=1), 1, generator=generator).squeeze(1)
    return z_db[top[torch.arange(len(q)), pick]]


# ----------------------------------------------------------------------------------------------------------
# ODE trajectories (section 8): states x_0 (noise) ... x_K (data) of an Euler run

def trajectory_metrics(states, ts):
    """states (K + 1, B, ...) and the K + 1 times: local straightness (mean cos of consecutive steps), global
    efficiency (chord / path length) and the per-segment length ratio r_k = |dx_k| / (|dt_k| |x_K - x_0|)."""
    x = states.double().flatten(2)                                           # (K + 1, B, D)
    dx = x[1:] - x[:-1]                                                       # (K, B, D)
    chord = (x[-1] - x[0]).norm(dim=-1)                                       # (B,)
    s_loc = F.cosine_similarity(dx[:-1], dx[1:], dim=-1).mean().item()
    e_glob = (chord / dx.norm(dim=-1).sum(0)).mean().item()
    dt = torch.tensor(np.diff(ts), dtype=torch.float64).abs()
    r = (dx.norm(dim=-1) / (dt[:, None] * chord[None])).mean(1)
    return {"local_straightness": s_loc, "global_efficiency": e_glob, "segment_ratio": r.tolist()}


# ----------------------------------------------------------------------------------------------------------
# correlations

def _rank(x):
    """Ranks 1..n with ties averaged (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        m = x == v
        r[m] = r[m].mean()
    return r


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt((xc ** 2).sum() * (yc ** 2).sum())
    return float((xc * yc).sum() / den) if den > 0 else float("nan")


def spearman(x, y):
    return pearson(_rank(x), _rank(y))


def _corr_rows(x, Y):
    """Pearson r of x (n,) with every row of Y (P, n)."""
    xc, Yc = x - x.mean(), Y - Y.mean(1, keepdims=True)
    den = np.sqrt((xc ** 2).sum() * (Yc ** 2).sum(1))
    return np.divide(Yc @ xc, den, out=np.full(len(Y), np.nan), where=den > 0)


def permutation_p(x, y, rank=False, n=20_000, exact_max=8, seed=0):
    """Two-sided p-value of Pearson r (Spearman rho with rank=True) under the null that y is exchangeable: over
    all n! orders of y when n <= exact_max, else n random orders counted with the observed one,
    (1 + #{|r*| >= |r|}) / (1 + n)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")                                                  # no correlation to test
    if rank:
        x, y = _rank(x), _rank(y)
    obs = abs(pearson(x, y)) - 1e-12                                         # ties with |r| count as extreme
    if len(y) <= exact_max:
        Y = y[np.array(list(itertools.permutations(range(len(y)))))]        # (n!, n)
        return float((np.abs(_corr_rows(x, Y)) >= obs).mean())
    rng = np.random.default_rng(seed)
    Y = y[np.argsort(rng.random((n, len(y))), axis=1)]                      # (n, n_obs)
    return float((1 + (np.abs(_corr_rows(x, Y)) >= obs).sum()) / (1 + n))


def partial_r(x, y, c):
    """Partial correlation of x and y given c (first order): (r_xy - r_xc r_yc) / sqrt((1 - r_xc^2)(1 - r_yc^2));
    NaN when c is constant (nothing to partial out: use r itself)."""
    rxy, rxc, ryc = pearson(x, y), pearson(x, c), pearson(y, c)
    den = math.sqrt(max((1 - rxc ** 2) * (1 - ryc ** 2), 0.0))
    return (rxy - rxc * ryc) / den if den > 0 else float("nan")


def holm(pvals):
    """Holm-Bonferroni adjusted p-values (same order as given): family-wise error control over the tests."""
    p = np.asarray(pvals, dtype=np.float64)
    order = np.argsort(p)
    adj = np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p))))
    out = np.empty_like(p)
    out[order] = np.minimum(adj, 1.0)
    return out.tolist()


def bootstrap_ci(x, y, fn, n=1000, level=0.95, seed=0):
    """Percentile interval of fn over n resamples of the pairs (resamples with a constant side are skipped)."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            vals.append(fn(x[i], y[i]))
    if not vals:
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]
