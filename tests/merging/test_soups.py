import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import tree as ct
from cljax.merging import average, greedy_soup, interpolate


def _tree(rng, dtype=np.float32):
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)), dtype),
        "head": jnp.asarray(rng.normal(size=(3,)), dtype),
        "n": jnp.asarray(rng.integers(0, 5, (2,)), jnp.int32),
    }


def test_uniform_and_weighted_average(rng):
    trees = [_tree(rng) for _ in range(3)]
    got = average(trees)
    np.testing.assert_allclose(got["w"], np.mean([np.asarray(t["w"]) for t in trees], 0), rtol=1e-6)
    np.testing.assert_array_equal(got["n"], trees[0]["n"])
    w = np.array([1.0, 2.0, 5.0])
    got = average(ct.stack(trees), w)
    expected = (
        sum(wi * np.asarray(t["w"], np.float64) for wi, t in zip(w, trees, strict=True)) / w.sum()
    )
    np.testing.assert_allclose(got["w"], expected, rtol=1e-6)
    jitted = jax.jit(average)(trees, jnp.asarray(w))
    chex.assert_trees_all_close(jitted, got, rtol=1e-6)


def test_average_rules_bfloat16_and_errors(rng):
    trees = [_tree(rng, jnp.bfloat16) for _ in range(2)]
    got = average(trees, rules=[("head", False)])
    assert got["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got["head"], trees[0]["head"])
    with pytest.raises(ValueError, match=r"weights of shape \(2,\) must have shape \(3,\)"):
        average(trees + trees[:1], [1.0, 2.0])
    with pytest.raises(ValueError, match="trees: got an empty list"):
        average([])


def test_interpolate(rng):
    a, b = _tree(rng), _tree(rng)
    chex.assert_trees_all_equal(interpolate(a, b, 0.0), a)
    chex.assert_trees_all_close(interpolate(a, b, 1.0)["w"], b["w"])
    got = jax.jit(interpolate)(a, b, 0.3)
    np.testing.assert_allclose(
        got["w"], 0.7 * np.asarray(a["w"]) + 0.3 * np.asarray(b["w"]), rtol=1e-6
    )
    np.testing.assert_array_equal(got["n"], a["n"])
    kept = interpolate(a, b, 0.5, rules=[("head", False)])
    np.testing.assert_array_equal(kept["head"], a["head"])
    with pytest.raises(ValueError, match="shape mismatch at path 'w'"):
        interpolate(a, {**b, "w": jnp.zeros((3, 4))}, 0.5)


def _lookup(table):
    calls = []

    def evaluate(tree):
        w = round(float(tree["w"][0]), 4)
        calls.append(w)
        return table[w]

    return evaluate, calls


def test_greedy_soup_hand_example():
    cands = [{"w": jnp.full((2,), v)} for v in (0.0, 1.0, 2.0, 10.0)]
    # Individual scores rank 1.0 > 2.0 > 0.0 > 10.0. Soups tried: {1,2} = 1.5 (better, kept),
    # {1,2,0} = 1.0 (worse), {1,2,10} = 13/3 (worse).
    table = {0.0: 0.5, 1.0: 0.9, 2.0: 0.7, 10.0: 0.1, 1.5: 0.95, 4.3333: 0.2}
    evaluate, calls = _lookup(table)
    soup, selected, scores = greedy_soup(cands, evaluate)
    assert selected == [1, 2]
    np.testing.assert_allclose(soup["w"], 1.5)
    np.testing.assert_allclose(scores, [0.5, 0.9, 0.7, 0.1])
    assert calls[4:] == [1.5, 1.0, 4.3333]


def test_greedy_soup_acceptance_is_strict():
    cands = ct.stack([{"w": jnp.full((2,), v)} for v in (1.0, 3.0)])
    evaluate, _ = _lookup({1.0: 0.6, 3.0: 0.5, 2.0: 0.6})  # the soup only ties: rejected
    soup, selected, _ = greedy_soup(cands, evaluate)
    assert selected == [0]
    np.testing.assert_array_equal(soup["w"], 1.0)
    evaluate, _ = _lookup({1.0: 0.6, 3.0: 0.5, 2.0: 0.6000001})
    _, selected, _ = greedy_soup(cands, evaluate)
    assert selected == [0, 1]


def test_greedy_soup_keeps_dtypes(rng):
    cands = [_tree(rng, jnp.bfloat16) for _ in range(3)]
    soup, selected, _ = greedy_soup(
        cands, lambda t: -float(jnp.abs(t["w"].astype(jnp.float32)).mean())
    )
    assert soup["w"].dtype == jnp.bfloat16 and soup["n"].dtype == jnp.int32
    assert len(selected) >= 1
