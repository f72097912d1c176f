"""Slow, obvious numpy references of the aggregators (float64, flattened vectors)."""

import itertools

import numpy as np


def flat(stacked):
    """[T, D] float64 matrix from a stacked dict-of-arrays tree (leaves in sorted key order)."""
    import jax

    leaves = jax.tree.leaves(stacked)
    t = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(t, -1) for x in leaves], axis=1)


def min_norm_qp(g):
    """Exact min of w^T G w on the simplex by enumerating supports (small T)."""
    t = g.shape[0]
    best, best_w = np.inf, None
    for k in range(1, t + 1):
        for s in itertools.combinations(range(t), k):
            s = list(s)
            a = np.zeros((k + 1, k + 1))
            a[:k, :k] = g[np.ix_(s, s)]
            a[:k, k] = 1
            a[k, :k] = 1
            rhs = np.zeros(k + 1)
            rhs[k] = 1
            sol = np.linalg.lstsq(a, rhs, rcond=None)[0][:k]
            if np.any(sol < -1e-12) or abs(sol.sum() - 1) > 1e-9:
                continue
            w = np.zeros(t)
            w[s] = np.maximum(sol, 0)
            val = w @ g @ w
            if val < best - 1e-15:
                best, best_w = val, w
    return best_w


def pcgrad(gs, orders):
    """PCGrad on flat gradients with given per-task orders (sum of projected)."""
    pc = gs.copy()
    for i in range(len(gs)):
        for j in orders[i]:
            d = pc[i] @ gs[j]
            if d < 0:
                pc[i] = pc[i] - d / (gs[j] @ gs[j]) * gs[j]
    return pc.sum(0)


def cagrad(gs, c, rescale=True):
    """CAGrad as the reference: scipy SLSQP on the dual, then d = g0 + c|g0|/|gw| gw."""
    from scipy.optimize import minimize

    t = len(gs)
    gg = gs @ gs.T
    g0_norm = np.sqrt(gg.mean())
    b = np.ones(t) / t
    cc = c * g0_norm

    def obj(x):
        return x @ gg @ b + cc * np.sqrt(x @ gg @ x + 1e-12)

    res = minimize(
        obj,
        b,
        bounds=[(0, 1)] * t,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    gw = res.x @ gs
    d = gs.mean(0) + cc / (np.linalg.norm(gw) + 1e-12) * gw
    return d / (1 + c * c) if rescale else d, res.x, obj


def imtl_g(gs):
    u = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    d = gs[0:1] - gs[1:]
    uu = u[0:1] - u[1:]
    alpha = gs[0] @ uu.T @ np.linalg.inv(d @ uu.T)
    alpha = np.concatenate([[1 - alpha.sum()], alpha])
    return alpha @ gs


def aligned(gs):
    m = gs @ gs.T
    lam, v = np.linalg.eigh(m)
    keep = lam > lam.max() * len(lam) * 1e-7
    lam, v = lam[keep], v[:, keep]
    b = np.sqrt(lam.min()) * v @ np.diag(1 / np.sqrt(lam)) @ v.T
    return b.sum(0) @ gs
