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


def test_leaves_must_be_arrays():
    ok = {
        "a": jnp.ones(2),
        "n": np.zeros(3, np.int8),
        "s": np.float32(1.0),
        "k": jax.random.key(0),
        "abstract": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    ct.check_leaves(ok)
    for leaf, what in [
        ("enc", r"a str \('enc'\)"),
        (1.5, r"a Python float \(1\.5\)"),
        (True, r"a Python bool \(True\)"),
        (np.array(["a"]), r"a numpy ndarray of dtype <U1"),
        (object(), r"a object \(<object object at .*>\)"),
    ]:
        with pytest.raises(TypeError, match=rf"params: leaf 'b/x' is {what}, not an array"):
            ct.check_leaves({"a": jnp.ones(2), "b": {"x": leaf}}, name="params")
    with pytest.raises(TypeError, match="trees\\[1\\]: leaf 'w' is a str"):
        ct.stack([{"w": jnp.ones(2)}, {"w": "x"}])
    with pytest.raises(TypeError, match="tree: leaf 'w' is a str"):
        ct.check_finite({"w": "x"})
    assert not ct.is_float("float32")  # a string is no dtype here


def test_a_stacked_set_needs_at_least_one_tree():
    t0 = {"w": jnp.zeros((0, 3)), "b": jnp.zeros((0,))}
    with pytest.raises(
        ValueError, match=r"stacked tree has T=0 \(a leading axis of size 0 at 'b'\)"
    ):
        ct.num_stacked(t0)
    with pytest.raises(ValueError, match=r"task_vectors: stacked tree has T=0"):
        ct.as_stacked(t0)
    with pytest.raises(ValueError, match=r"T=0"):
        ct.unstack(t0)
    assert ct.num_stacked({"w": jnp.zeros((1, 3))}) == 1


def test_accumulation_dtypes():
    assert ct.accum_dtype(jnp.bfloat16) == jnp.float32
    assert ct.accum_dtype(jnp.float16) == jnp.float32
    t = {"a": jnp.ones(2, jnp.bfloat16), "i": jnp.ones(2, jnp.int32)}
    acc = ct.to_accum(t)
    assert acc["a"].dtype == jnp.float32 and acc["i"].dtype == jnp.int32
    back = ct.cast_like(acc, t)
    assert back["a"].dtype == jnp.bfloat16
    assert ct.is_float(np.ones(2, np.float16)) and not ct.is_float(np.ones(2, np.int8))


def test_nnx_paths_drop_the_variable_key():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.Dense_0 = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    raw = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert raw[0][-1] == jax.tree_util.GetAttrKey("value")  # what flax produces
    assert ct.paths(state) == ["Dense_0/bias", "Dense_0/kernel", "head/bias", "head/kernel"]
    # The same rules select the same leaves as in the linen-style dict.
    linen = {"Dense_0": {"kernel": 0, "bias": 0}, "head": {"kernel": 0, "bias": 0}}
    rules = [(r"^head/", False), (r"kernel$", True)]
    got = sorted(p for p, m in ct.leaves_with_paths(ct.rule_mask(state, rules)) if m)
    want = sorted(p for p, m in ct.leaves_with_paths(ct.rule_mask(linen, rules)) if m)
    assert got == want == ["Dense_0/kernel"]
    # A dict key called "value" is a real key and stays in the path.
    assert ct.paths({"a": {"value": 1}}) == ["a/value"]


def test_a_rule_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"rules\[1\]=\('kernel/value\$', True\) selects no leaf"):
        ct.rule_mask(_params(), [("head", False), ("kernel/value$", True)])
    with pytest.raises(ValueError, match=r"'encoder/Dense_0/bias'"):  # names example paths
        ct.rule_values(_params(), [("nope", 1)])
    # Fully shadowed by an earlier rule (first match wins): also selects nothing.
    with pytest.raises(ValueError, match=r"taken by an earlier rule .*rules\[0\]='\.\*'"):
        ct.rule_mask(_params(), [(".*", True), ("head", False)])
    # The documented opt-out, and an empty tree has nothing to select.
    assert ct.rule_values(_params(), [("nope", 1)], default=0, allow_unused=True)["step"] == 0
    assert ct.rule_values({}, [("nope", 1)]) == {}


def test_dict_with_mixed_key_types_is_named_with_its_path():
    # JAX sorts dict keys to flatten; {0: .., "b": ..} fails inside the sort with a message
    # that names neither the argument nor the dict. The error names both.
    from flax import nnx
    from flax.core import FrozenDict

    from cljax import merging

    x = jnp.ones(2)
    bad = {"enc": {"layers": [{"w": x}, {0: x, "b": x}]}, "head": x}
    good = {"enc": {"layers": [{"w": x}, {"0": x, "b": x}]}, "head": x}
    with pytest.raises((ValueError, TypeError)):  # what JAX says on its own
        jax.tree_util.tree_flatten_with_path(bad)
    with pytest.raises(TypeError, match=r"^tree: the dict at path 'enc/layers/1' has keys of mixed types \(int and str: 0, 'b'\)"):  # fmt: skip
        ct.leaves_with_paths(bad)
    with pytest.raises(TypeError, match=r"^finetuned: the dict at path 'enc/layers/1'"):
        merging.task_vector(bad, good)
    with pytest.raises(TypeError, match=r"^task_vectors\[1\]: the dict at path 'enc/layers/1'"):
        merging.task_arithmetic(good, [good, bad])
    with pytest.raises(TypeError, match=r"^task_vectors: stacked tree: its top-level dict"):
        ct.as_stacked({1: x[None], "a": x[None]})
    for container in (FrozenDict, nnx.State):  # Mappings that sort their keys too
        with pytest.raises(TypeError, match=r"^params: the dict at path 'm' .*\(int and str: 1, 'a'\)"):  # fmt: skip
            ct.check_leaves(container({"m": {1: x, "a": x}}), name="params")
    # keys of one type, even unusual ones, still flatten
    assert ct.paths({1: x, 2: {(0, 1): x}}) == ["1", "2/(0, 1)"]
    with pytest.raises(TypeError, match=r"mixed types \(str and tuple: \(0, 1\), 'a'\)"):
        ct.paths({(0, 1): x, "a": x})

    class Broken:  # a node whose own flattening fails: JAX's error passes through as it is
        pass

    jax.tree_util.register_pytree_node(
        Broken, lambda b: (_ for _ in ()).throw(ValueError("cannot flatten")), lambda a, c: None
    )
    with pytest.raises(ValueError, match="^cannot flatten$"):
        ct.leaves_with_paths({"a": Broken()})
