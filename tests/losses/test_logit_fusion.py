"""Logit arithmetic and dynamic logit fusion against numpy loops and a brute-force oracle."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import losses


def _np_log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _np_kl(p_logits, q_logits):
    lp, lq = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def test_logit_arithmetic_matches_a_loop(rng):
    large, base = rng.normal(size=(2, 3, 5))
    experts = rng.normal(size=(2, 3, 5))
    alpha = np.array([0.5, 1.5])
    want = large.copy()
    for t in range(2):
        want += alpha[t] * (experts[t] - base)
    got = jax.jit(losses.logit_arithmetic)(large, base, experts, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a list of experts, a scalar alpha, per-position alphas
    np.testing.assert_allclose(
        losses.logit_arithmetic(large, base, list(experts), 0.5),
        large + 0.5 * (experts[0] - base) + 0.5 * (experts[1] - base),
        rtol=1e-5,
        atol=1e-5,
    )
    per_pos = rng.random((2, 3))
    want = large + sum(per_pos[t][:, None] * (experts[t] - base) for t in range(2))
    np.testing.assert_allclose(
        losses.logit_arithmetic(large, base, experts, per_pos), want, rtol=1e-5, atol=1e-5
    )
    assert (
        losses.logit_arithmetic(
            large.astype(np.float32).astype(jnp.bfloat16), base, experts, 1.0
        ).dtype
        == jnp.bfloat16
    )


def test_identical_models_single_expert_gives_alpha_one(rng):
    base = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    expert = base + jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    grid = jnp.arange(21, dtype=jnp.float32) / 10
    fused, alpha = jax.jit(lambda a, b, e: losses.dynamic_logit_fusion(a, b, e, grid=grid))(
        base, base, expert[None]
    )
    np.testing.assert_array_equal(alpha, 1.0)
    assert alpha.shape == (1, 4)
    np.testing.assert_allclose(fused, expert, rtol=1e-6, atol=1e-6)


def _oracle(large, base, experts, grid):
    """Brute force over the grid with numpy, one position at a time."""
    t = experts.shape[0]
    alphas = np.zeros((t,) + large.shape[:-1])
    for pos in np.ndindex(large.shape[:-1]):
        target = [_np_kl(experts[(k, *pos)], base[pos]) for k in range(t)]
        best, best_a = np.inf, None
        for a in itertools.product(grid, repeat=t):
            fused = large[pos] + sum(a[k] * (experts[(k, *pos)] - base[pos]) for k in range(t))
            kl = _np_kl(fused, large[pos])
            j = sum((kl - target[k]) ** 2 for k in range(t))
            if j < best - 1e-9:
                best, best_a = j, a
        alphas[(slice(None), *pos)] = best_a
    return alphas


@pytest.mark.slow
def test_dynamic_fusion_matches_brute_force_oracle(rng):
    grid = np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
    large = rng.normal(size=(3, 2, 6)) * 2
    base = rng.normal(size=(3, 2, 6))
    for t in (1, 2):
        experts = base[None] + rng.normal(size=(t, 3, 2, 6)) * rng.uniform(
            0.3, 2.0, size=(t, 1, 1, 1)
        )
        fused, alpha = losses.dynamic_logit_fusion(large, base, experts, grid=grid)
        want = _oracle(large, base, experts, grid)
        np.testing.assert_allclose(alpha, want)
        np.testing.assert_allclose(
            fused, losses.logit_arithmetic(large, base, experts, want), rtol=1e-5, atol=1e-5
        )


@pytest.mark.slow
def test_default_grid_and_shift_matching():
    # one expert: the fused model's KL from the large model is as close to the expert's
    # shift as the grid allows
    rng = np.random.default_rng(0)
    large, base = rng.normal(size=(2, 5, 9))
    expert = base + rng.normal(size=(5, 9))
    fused, alpha = losses.dynamic_logit_fusion(large, base, [expert])
    for i in range(5):
        target = _np_kl(expert[i], base[i])
        got = _np_kl(np.asarray(fused[i], np.float64), large[i])
        for a in np.linspace(0, 2, 21):
            other = _np_kl(large[i] + a * (expert[i] - base[i]), large[i])
            assert abs(got - target) <= abs(other - target) + 1e-5


def test_bad_inputs():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"must have one shape"):
        losses.logit_arithmetic(x, jnp.ones((2, 4)), [x], 1.0)
    with pytest.raises(ValueError, match=r"experts \(1, 2, 4\) must be"):
        losses.logit_arithmetic(x, x, jnp.ones((1, 2, 4)), 1.0)
    with pytest.raises(ValueError, match=r"alpha \(3,\) must be"):
        losses.logit_arithmetic(x, x, [x, x], jnp.ones(3))
    with pytest.raises(ValueError, match=r"grid \(0,\) must be a non-empty 1-D"):
        losses.dynamic_logit_fusion(x, x, [x], grid=jnp.zeros(0))
    with pytest.raises(ValueError, match=r"experts is empty"):
        losses.dynamic_logit_fusion(x, x, [])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"logit_arithmetic: alpha=.* must be finite"):
            losses.logit_arithmetic(x, x, [x, x], [1.0, bad])
        with pytest.raises(ValueError, match=r"dynamic_logit_fusion: grid=.* must be finite"):
            losses.dynamic_logit_fusion(x, x, [x], grid=[0.0, bad])


@pytest.mark.slow
def test_docs_page_code_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "logit-fusion.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/logit-fusion.md", "exec"), {})
