import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import tree as ct


def _params():
    return {
        "encoder": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}},
        "head": {"kernel": jnp.full((4, 2), 2.0), "bias": jnp.zeros(2)},
        "step": jnp.array(3, jnp.int32),
    }


def test_paths_are_slash_joined_in_flatten_order():
    p = ct.paths(_params())
    assert p == [
        "encoder/Dense_0/bias",
        "encoder/Dense_0/kernel",
        "head/bias",
        "head/kernel",
        "step",
    ]
    assert ct.paths([{"a": 1}, (2,)]) == ["0/a", "1/0"]


def test_stack_unstack_roundtrip(rng):
    trees = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), _params())
        for _ in range(3)
    ]
    s = ct.stack(trees)
    chex.assert_shape(s["head"]["kernel"], (3, 4, 2))
    assert ct.num_stacked(s) == 3
    for a, b in zip(ct.unstack(s), trees, strict=True):
        chex.assert_trees_all_equal(a, b)
    assert ct.as_stacked(trees)["head"]["kernel"].shape == (3, 4, 2)
    assert ct.as_stacked(s) is s


def test_stack_errors_name_the_path():
    a = _params()
    b = _params()
    b["head"]["kernel"] = jnp.ones((5, 2))
    with pytest.raises(ValueError, match="head/kernel"):
        ct.stack([a, b])
    c = _params()
    del c["head"]["bias"]
    with pytest.raises(ValueError, match="head/bias"):
        ct.check_same_structure(a, c)
    with pytest.raises(ValueError, match="empty"):
        ct.as_stacked([])
    with pytest.raises(ValueError, match="leading"):
        ct.num_stacked({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))})


def test_check_same_structure_with_leading_axis():
    a = _params()
    s = ct.stack([a, a])
    ct.check_same_structure(a, s, b_leading=(2,))
    with pytest.raises(ValueError, match="expected"):
        ct.check_same_structure(a, s, b_leading=(3,))


def test_rules_first_match_wins_and_describe():
    rules = [(r"^head/", "head"), (r"kernel", "kernel"), (r".*", "rest")]
    vals = ct.rule_values(_params(), rules)
    assert vals["head"]["kernel"] == "head"  # first rule wins over 'kernel'
    assert vals["encoder"]["Dense_0"]["kernel"] == "kernel"
    assert vals["encoder"]["Dense_0"]["bias"] == "rest"
    text = ct.describe_rules(_params(), rules)
    assert "rule 0 '^head/'" in text and "head/kernel" in text
    assert ct.unused_rules(_params(), [("nothing-here", 1), (".*", 2)]) == ["nothing-here"]
    mask = ct.rule_mask(_params(), [("head", False), (".*", True)])
    assert mask["head"]["bias"] is False and mask["encoder"]["Dense_0"]["bias"] is True
    with pytest.raises(ValueError, match="invalid regex"):
        ct.rule_values(_params(), [("(", 1)])
    with pytest.raises(ValueError, match="pair"):
        ct.rule_values(_params(), ["oops"])


def test_check_finite_names_the_path():
    t = _params()
    ct.check_finite(t)
    t["head"]["bias"] = jnp.array([0.0, jnp.nan])
    with pytest.raises(ValueError, match="head/bias"):
        ct.check_finite(t, name="finetuned")


def test_accumulation_dtypes():
    assert ct.accum_dtype(jnp.bfloat16) == jnp.float32
    assert ct.accum_dtype(jnp.float16) == jnp.float32
    t = {"a": jnp.ones(2, jnp.bfloat16), "i": jnp.ones(2, jnp.int32)}
    acc = ct.to_accum(t)
    assert acc["a"].dtype == jnp.float32 and acc["i"].dtype == jnp.int32
    back = ct.cast_like(acc, t)
    assert back["a"].dtype == jnp.bfloat16
    assert ct.is_float(np.ones(2, np.float16)) and not ct.is_float(np.ones(2, np.int8))
