"""Call-time validation of the merges' scalar hyperparameters and their check_finite option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import merging

P = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
T = [
    {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)},
    {"w": jnp.full((2, 3), -1.0), "b": jnp.ones(3)},
]
NAN_T = [T[0], {"w": jnp.full((2, 3), jnp.nan), "b": jnp.ones(3)}]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: merging.ties(P, T, density=True), r"density=True must be a real number"),
        (lambda: merging.ties(P, T, density=np.float32(1.5)), r"density=.*must be in \(0, 1\]"),
        (lambda: merging.ties(P, T, density=float("nan")), r"density=nan must be finite"),
        (lambda: merging.ties(P, T, scale=np.nan), r"ties: scale=nan must be finite"),
        (lambda: merging.task_arithmetic(P, T, scale=float("inf")), r"scale=inf must be finite"),
        (lambda: merging.task_arithmetic(P, T, scale=jnp.ones(3)), r"scale=.* must be a scalar"),
        (lambda: merging.task_arithmetic(P, T, scale="0.3"), r"scale='0.3' must be a real"),
        (lambda: merging.apply(P, T[0], scale=np.float64("nan")), r"apply: scale=.*finite"),
        (lambda: merging.dare(T, drop_rate=True, key=0), r"drop_rate=True must be a real"),
        (lambda: merging.dare(T, drop_rate=np.nan, key=0), r"drop_rate=nan must be finite"),
        (lambda: merging.dare(T, drop_rate=1.0, key=0), r"drop_rate=1.0 must be in \[0, 1\)"),
        (lambda: merging.average(T, weights=[1.0, -1.0]), r"sum to 0"),
        (lambda: merging.average(T, weights=[1.0, np.nan]), r"weights=.* must be finite"),
        (lambda: merging.interpolate(P, P, np.nan), r"alpha=nan must be finite"),
    ],
)
def test_bad_scalar_hyperparameters_raise_at_call_time(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_numpy_scalars_in_range_are_accepted_and_match_python_floats():
    for dtype in (np.float32, np.float64):
        got = merging.ties(P, T, density=dtype(0.5), scale=dtype(0.75))
        want = merging.ties(P, T, density=0.5, scale=0.75)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    got = merging.task_arithmetic(P, T, scale=np.float32(0.25))
    want = jax.tree.map(lambda p, a, b: p + np.float32(0.25) * (a + b), P, *T)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, want)
    merging.dare(T, drop_rate=np.float32(0.5), key=0)
    merging.average(T, weights=np.array([1, 3]))


def test_traced_hyperparameters_still_work_under_jit():
    f = jax.jit(lambda s: merging.task_arithmetic(P, T, scale=s))
    jax.tree.map(np.testing.assert_array_equal, f(0.5), merging.task_arithmetic(P, T, scale=0.5))


@pytest.mark.parametrize(
    "call",
    [
        lambda: merging.task_arithmetic(P, NAN_T, check_finite=True),
        lambda: merging.ties(P, NAN_T, check_finite=True),
        lambda: merging.dare(NAN_T, drop_rate=0.5, key=0, check_finite=True),
        lambda: merging.average(NAN_T, check_finite=True),
        lambda: merging.apply(P, NAN_T[1], check_finite=True),
        lambda: merging.task_vector(NAN_T[1], P, check_finite=True),
        # finite inputs, an overflowing result
        lambda: merging.apply(
            P, {"w": jnp.full((2, 3), 3e38), "b": P["b"]}, 10.0, check_finite=True
        ),
    ],
)
def test_check_finite_raises_on_nonfinite_inputs_or_result(call):
    with pytest.raises(ValueError, match=r"non-finite value"):
        call()


def test_check_finite_passes_finite_merges():
    merging.task_arithmetic(P, T, scale=0.3, check_finite=True)
    merging.ties(P, T, check_finite=True)
    merging.average(T, check_finite=True)
