"""PRD's losses (SupCon, prototype loss, relation distillation) against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import losses


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_supcon(feats, labels, temp, base_temp):
    n, v, _ = feats.shape
    z = [
        (_unit(feats[i, k]), labels[i] if labels is not None else i)
        for k in range(v)
        for i in range(n)
    ]
    losses_ = []
    for a, (za, la) in enumerate(z):
        denom = sum(np.exp(za @ zb / temp) for b, (zb, _) in enumerate(z) if b != a)
        pos = [b for b, (_, lb) in enumerate(z) if b != a and lb == la]
        if not pos:
            continue
        lp = [za @ z[b][0] / temp - np.log(denom) for b in pos]
        losses_.append(-(temp / base_temp) * np.mean(lp))
    return np.mean(losses_)


def test_supcon_matches_numpy_loop(rng):
    f = rng.normal(size=(6, 2, 5))
    y = np.array([0, 1, 0, 2, 1, 0])
    got = jax.jit(lambda a, b: losses.supervised_contrastive_loss(a, b, temperature=0.2))(f, y)
    assert float(got) == pytest.approx(_np_supcon(f, y, 0.2, 0.07), rel=1e-5)
    # SimCLR without labels; one view with singleton labels (anchors without positives left out)
    got = losses.supervised_contrastive_loss(f, temperature=0.5, base_temperature=0.5)
    assert float(got) == pytest.approx(_np_supcon(f, None, 0.5, 0.5), rel=1e-5)
    got = losses.supervised_contrastive_loss(f[:, :1], y, temperature=0.3)
    assert float(got) == pytest.approx(_np_supcon(f[:, :1], y, 0.3, 0.07), rel=1e-5)


def test_prototype_loss_matches_numpy_and_stops_feature_gradient(rng):
    f = rng.normal(size=(7, 4))
    w = rng.normal(size=(3, 4))
    y = rng.integers(0, 3, size=7)
    want = np.mean([1 - _unit(f[i]) @ _unit(w[y[i]]) for i in range(7)])
    assert float(jax.jit(losses.prototype_loss)(f, y, w)) == pytest.approx(want, rel=1e-5)
    gf, gw = jax.grad(losses.prototype_loss, argnums=(0, 2))(jnp.asarray(f), y, jnp.asarray(w))
    np.testing.assert_array_equal(gf, 0.0)
    assert np.abs(np.asarray(gw)).sum() > 0


def _np_relation(fs, ft, ws, wt, temp):
    """Loop over groups and samples; scores <f, w> / |w|, softmax over a group's prototypes."""
    ws, wt = ws.reshape(-1, *ws.shape[-2:]), wt.reshape(-1, *wt.shape[-2:])
    total = 0.0
    for g in range(ws.shape[0]):
        per = []
        for i in range(fs.shape[0]):
            s = np.array([fs[i] @ w / np.linalg.norm(w) for w in ws[g]]) / temp
            t = np.array([ft[i] @ w / np.linalg.norm(w) for w in wt[g]]) / temp
            q = np.exp(t - t.max())
            q /= q.sum()
            lp = s - s.max()
            lp -= np.log(np.exp(lp).sum())
            per.append(np.sum(q * (np.log(q) - lp)))
        total += np.mean(per)
    return total


def test_relation_distillation_matches_numpy_loop(rng):
    fs, ft = rng.normal(size=(2, 8, 5))
    ws, wt = rng.normal(size=(2, 4, 5)) * 3
    got = jax.jit(lambda *a: losses.relation_distillation(*a, temperature=0.5))(fs, ft, ws, wt)
    assert float(got) == pytest.approx(_np_relation(fs, ft, ws, wt, 0.5), rel=1e-5)
    # one group a task: softmax within each, summed
    ws, wt = rng.normal(size=(2, 3, 4, 5))
    got = losses.relation_distillation(fs, ft, ws, wt)
    assert float(got) == pytest.approx(_np_relation(fs, ft, ws, wt, 1.0), rel=1e-5)


def test_relation_distillation_where_selects_prototypes(rng):
    """A mask equals the loop over the selected prototypes; an empty group adds 0."""
    fs, ft = rng.normal(size=(2, 6, 5))
    ws, wt = rng.normal(size=(2, 3, 4, 5))
    where = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
    f = jax.jit(lambda *a: losses.relation_distillation(*a, temperature=0.7, where=where))
    got = f(fs, ft, ws, wt)
    want = sum(_np_relation(fs, ft, ws[g][where[g]], wt[g][where[g]], 0.7) for g in range(2))
    assert float(got) == pytest.approx(want, rel=1e-5)
    grads = jax.grad(lambda w: f(fs, ft, w, wt))(jnp.asarray(ws, jnp.float32))
    assert np.isfinite(np.asarray(grads)).all()
    np.testing.assert_array_equal(np.asarray(grads)[~where], 0.0)  # unselected: no gradient
    with pytest.raises(ValueError, match=r"where \(3,\) must be \(3, 4\)"):
        losses.relation_distillation(fs, ft, ws, wt, where=np.ones(3, bool))


@pytest.mark.slow
def test_relation_zero_when_unchanged_and_no_teacher_gradient(rng):
    f = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    assert float(losses.relation_distillation(f, f, w, w)) == pytest.approx(0.0, abs=1e-6)
    gs = jax.grad(losses.relation_distillation, argnums=(0, 2))(f, f, w, w)
    np.testing.assert_allclose(gs[0], 0.0, atol=1e-6)
    gt = jax.grad(losses.relation_distillation, argnums=(1, 3))(f + 1.0, f, w + 0.5, w)
    np.testing.assert_array_equal(gt[0], 0.0)
    np.testing.assert_array_equal(gt[1], 0.0)


def test_bad_inputs():
    f = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"temperature=0.0 must be > 0"):
        losses.supervised_contrastive_loss(jnp.ones((4, 2, 3)), temperature=0.0)
    with pytest.raises(ValueError, match=r"must be \[N, V, D\]"):
        losses.supervised_contrastive_loss(f)
    with pytest.raises(ValueError, match=r"differ in feature size"):
        losses.prototype_loss(f, jnp.zeros(4, int), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"prototypes must be one"):
        losses.relation_distillation(f, f, jnp.ones((2, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match=r"temperature=-1.0 must be > 0"):
        losses.relation_distillation(f, f, jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=-1.0)


@pytest.mark.slow
def test_docs_page_code_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "prd.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/prd.md", "exec"), {})
