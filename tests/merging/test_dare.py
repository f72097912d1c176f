import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import tree as ct
from cljax.merging import dare
from cljax.merging._dare import entry_bits


def _tree(rng, dtype=np.float32):
    return {
        "a": jnp.asarray(rng.normal(size=(40, 25)), dtype),
        "b": jnp.asarray(rng.normal(size=(40, 25)), dtype),
        "head": jnp.asarray(rng.normal(size=(7,)), dtype),
        "ids": jnp.arange(4, dtype=jnp.int32),
    }


def test_drops_the_right_fraction_and_rescales_exactly(rng):
    p = 0.3
    tau = {"w": jnp.asarray(rng.uniform(0.5, 1.5, size=(200, 500)), jnp.float32)}
    out = dare([tau, tau], drop_rate=p, key=jax.random.key(0))
    w = np.asarray(out["w"])
    x = np.asarray(tau["w"])
    n = x.size
    for t in range(2):
        dropped = int((w[t] == 0).sum())
        # Binomial(n, p): 6 standard deviations, two-sided miss probability ~2e-9.
        assert abs(dropped - p * n) < 6 * np.sqrt(n * p * (1 - p)), dropped
        kept = w[t] != 0
        np.testing.assert_array_equal(w[t][kept], x[kept] * np.float32(1 / (1 - p)))
    # Masks differ between tasks (and so do not depend on the task's values).
    assert (w[0] != 0).tolist() != (w[1] != 0).tolist()


def test_keeps_the_mean_over_many_keys(rng):
    p, num_keys = 0.6, 400
    tau = {"w": jnp.asarray(rng.uniform(-2, 2, size=(256,)), jnp.float32)}
    keys = jax.random.split(jax.random.key(1), num_keys)
    outs = jax.jit(jax.vmap(lambda k: dare([tau], drop_rate=p, key=k)["w"][0]))(keys)
    mean = np.asarray(outs, np.float64).mean(0)
    x = np.asarray(tau["w"], np.float64)
    # Each output is x·Bernoulli(1-p)/(1-p): mean x, std |x|·sqrt(p/(1-p)). A z-bound of 5 on
    # each of 256 coordinates fails with probability ~256·6e-7 ≈ 1.5e-4.
    sem = np.abs(x) * np.sqrt(p / (1 - p) / num_keys)
    assert np.all(np.abs(mean - x) < 5 * sem + 1e-7)


def test_deterministic_per_key_and_independent_per_leaf(rng):
    tv = _tree(rng)
    same = {**tv, "b": tv["a"]}  # two leaves with equal values and shapes
    k = jax.random.key(7)
    o1 = dare([same], drop_rate=0.5, key=k)
    o2 = dare([same], drop_rate=0.5, key=k)
    np.testing.assert_array_equal(o1["a"], o2["a"])
    assert not np.array_equal(np.asarray(o1["a"]) == 0, np.asarray(o1["b"]) == 0)
    o3 = dare([same], drop_rate=0.5, key=jax.random.key(8))
    assert not np.array_equal(np.asarray(o1["a"]) == 0, np.asarray(o3["a"]) == 0)
    # A leaf's mask depends on its path, not on which other leaves are there.
    alone = dare([{"a": same["a"]}], drop_rate=0.5, key=k)
    np.testing.assert_array_equal(alone["a"], o1["a"])
    # An int seed is accepted.
    np.testing.assert_array_equal(
        dare([same], drop_rate=0.5, key=3)["a"],
        dare([same], drop_rate=0.5, key=jax.random.key(3))["a"],
    )


def test_stacked_equals_list_and_rules_pass_through(rng):
    taus = [_tree(rng) for _ in range(3)]
    k = jax.random.key(0)
    from_list = dare(taus, drop_rate=0.5, key=k, rules=[("head", False)])
    from_stack = dare(ct.stack(taus), drop_rate=0.5, key=k, rules=[("head", False)])
    for (p, x), y in zip(ct.leaves_with_paths(from_list), jax.tree.leaves(from_stack), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=p)
    np.testing.assert_array_equal(from_list["head"], ct.stack(taus)["head"])
    np.testing.assert_array_equal(from_list["ids"], ct.stack(taus)["ids"])
    assert from_list["a"].shape == (3, 40, 25)


def test_drop_only_and_zero_rate(rng):
    tv = _tree(rng)
    drop_only = dare([tv], drop_rate=0.5, key=0, rescale=False)["a"][0]
    kept = np.asarray(drop_only) != 0
    np.testing.assert_array_equal(np.asarray(drop_only)[kept], np.asarray(tv["a"])[kept])
    np.testing.assert_array_equal(dare([tv], drop_rate=0.0, key=0)["a"][0], tv["a"])


def test_bfloat16_rescaled_in_float32(rng):
    tv = _tree(rng, jnp.bfloat16)
    p = 0.9
    out = dare([tv], drop_rate=p, key=0)["a"][0]
    assert out.dtype == jnp.bfloat16
    kept = np.asarray(out, np.float32) != 0
    expected = (np.asarray(tv["a"], np.float32) * np.float32(1 / (1 - p))).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out)[kept], expected[kept])


def test_bad_inputs(rng):
    tv = _tree(rng)
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"drop_rate=.* must be in \[0, 1\)"):
            dare([tv], drop_rate=p, key=0)
    with pytest.raises(ValueError, match="empty list"):
        dare([], drop_rate=0.1, key=0)
    bad = {**tv, "head": jnp.zeros((8,))}
    with pytest.raises(ValueError, match="shape mismatch at path 'head'"):
        dare([tv, bad], drop_rate=0.1, key=0)


def _fmix32_np(h):
    h = np.uint64(h)
    m = np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & m
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & m
    return h ^ (h >> np.uint64(16))


def test_entry_bits_against_a_loop_over_entries():
    # The documented formula, entry by entry, in 64-bit numpy arithmetic masked to 32 bits.
    words = np.array([[1, 2], [0xDEADBEEF, 0xFFFFFFFF], [7, 0]], np.uint32).reshape(3, 1, 2)
    shape = (3, 1, 4, 5)
    got = np.asarray(entry_bits(shape, jnp.asarray(words), batch_dims=2))
    assert got.shape == shape and got.dtype == np.uint32
    for b in range(3):
        for i in range(20):
            w0, w1 = (np.uint64(w) for w in words[b, 0])
            h = _fmix32_np((np.uint64(i) * np.uint64(0x9E3779B9) + w0) & np.uint64(0xFFFFFFFF))
            expected = _fmix32_np(h ^ w1)
            assert got[b, 0].reshape(-1)[i] == expected, (b, i)


def test_entry_bits_refuses_indices_past_uint32():
    with pytest.raises(ValueError, match=r"entry_bits: shape=\(2, 65536, 65536\)"):
        entry_bits((2, 1 << 16, 1 << 16), jnp.zeros((2, 2), jnp.uint32), batch_dims=1)


def test_entry_bits_look_independent():
    # 2**20 entries of each of two keys: the top byte is uniform (chi-square, 255 degrees
    # of freedom, bound at mean + 6 sd), and each bit agrees with the same bit of the next
    # entry, of the other key at the same entry and of the entry 2**10 further on with
    # frequency 1/2 (6 binomial standard deviations).
    words = jax.random.bits(jax.random.key(5), (2, 2), jnp.uint32)
    bits = np.asarray(entry_bits((2, 1 << 20), words, batch_dims=1))
    counts = np.bincount((bits[0] >> 24).astype(np.int64), minlength=256)
    expected = bits.shape[1] / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2
    pairs = {
        "next entry": (bits[0, :-1], bits[0, 1:]),
        "other key": (bits[0], bits[1]),
        "2**10 further": (bits[0, : -(1 << 10)], bits[0, 1 << 10 :]),
    }
    for name, (a, b) in pairs.items():
        for j in range(32):
            agree = np.mean(((a >> j) & 1) == ((b >> j) & 1))
            assert abs(agree - 0.5) < 6 * 0.5 / np.sqrt(a.size), (name, j, agree)


def test_dare_fuses_its_random_bits():
    # The drop is elementwise: XLA plans no temporaries of the task vectors' size.
    tvs = {"w": jnp.ones((4, 256, 300), jnp.float32), "b": jnp.ones((4, 300), jnp.float32)}
    compiled = jax.jit(lambda t: dare(t, drop_rate=0.9, key=0)).lower(tvs).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("no memory analysis on this backend")
    inputs = sum(x.nbytes for x in jax.tree.leaves(tvs))
    assert analysis.temp_size_in_bytes < 0.05 * inputs, analysis.temp_size_in_bytes


def test_eager_windows_match_the_traced_merge(rng):
    """Eager DARE on CPU arrays reads rows in fixed windows (the last one overlapping) and packs
    short rows together; it must give the traced merge's bits exactly, for a row longer than
    one window with a ragged end, a row between the packed and the window sizes, and short ones."""
    tree = {
        "long": jnp.asarray(rng.normal(size=(2**18 + 1000,)), jnp.float32),
        "mid": jnp.asarray(rng.normal(size=(300, 250)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
        "ids": jnp.arange(4, dtype=jnp.int32),
    }
    tvs = [
        jax.tree.map(lambda x, s=s: x * s if x.dtype == jnp.float32 else x, tree)
        for s in (1, -2, 3)
    ]
    eager = dare(tvs, drop_rate=0.7, key=jax.random.key(3))
    traced = jax.jit(lambda t: dare(t, drop_rate=0.7, key=jax.random.key(3)))(tvs)
    for name in tree:
        np.testing.assert_array_equal(np.asarray(eager[name]), np.asarray(traced[name]))
    assert 0.6 < float((np.asarray(eager["long"]) == 0).mean()) < 0.8
