"""Tests of cljax/_checks.py: the call-time validation of hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax._checks import check_int, check_scalar


@pytest.mark.parametrize(
    "value",
    [0.5, 1, np.float32(0.5), np.float64(1.0), np.int64(1), jnp.asarray(0.5), np.asarray(0.25)],
)
def test_check_scalar_accepts_real_scalars_of_every_kind(value):
    check_scalar(value, name="rho", where="f", low=0.0, high=1.0)


@pytest.mark.parametrize(
    "value, message",
    [
        (True, r"f: rho=True must be a real number"),
        ("0.1", r"f: rho='0.1' must be a real number"),
        (None, r"f: rho=None must be a real number"),
        (float("nan"), r"f: rho=nan must be finite"),
        (float("inf"), r"f: rho=inf must be finite"),
        (np.float32(-1.0), r"f: rho=.*-1\.0.* must be >= 0"),
        (jnp.ones(2), r"f: rho=.* must be a scalar; got shape \(2,\)"),
        (np.asarray(1 + 2j), r"must be a real number; got dtype complex128"),
    ],
)
def test_check_scalar_rejects_with_the_value(value, message):
    with pytest.raises(ValueError, match=message):
        check_scalar(value, name="rho", where="f", low=0.0)


def test_check_scalar_ranges_and_traced_values():
    with pytest.raises(ValueError, match=r"f: x=0\.0 must be > 0"):
        check_scalar(0.0, name="x", where="f", low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"f: x=1\.0 must be in \[0, 1\)"):
        check_scalar(1.0, name="x", where="f", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"f: x=2 must be <= 1"):
        check_scalar(2, name="x", where="f", high=1.0)
    jax.jit(lambda x: check_scalar(x, name="x", where="f", low=0.0) or x)(-1.0)  # traced: passes


def test_check_int():
    assert check_int(np.int64(3), name="every", where="swa", low=1) == 3
    assert type(check_int(np.int32(3), name="every", where="swa")) is int
    for bad in (2.5, 2.0, True, "2", float("inf"), np.asarray([2])):
        with pytest.raises(ValueError, match=r"swa: every=.* must be an integer >= 1"):
            check_int(bad, name="every", where="swa", low=1)
    with pytest.raises(ValueError, match=r"swa: every=0 must be an integer >= 1"):
        check_int(0, name="every", where="swa", low=1)
    with pytest.raises(ValueError, match=r"f: k=9 must be an integer in \[1, 8\]"):
        check_int(9, name="k", where="f", low=1, high=8)
