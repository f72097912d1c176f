"""Streaming merges of safetensors files equal in-memory merges (slow numpy references)."""

import numpy as np
import pytest

from cljax import safetensors as st
from cljax.merging._streaming import merge_safetensors

SHAPES = {"enc.w": (40, 30), "enc.b": (30,), "head.w": (30, 5), "pos_ids": (1, 7)}


def _models(rng, T=3, dtype=np.float32):
    base = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items() if k != "pos_ids"}
    base["pos_ids"] = np.arange(7)[None]
    fts = []
    for t in range(T):
        m = {
            k: (v + rng.normal(scale=0.1 * (t + 1), size=v.shape)).astype(dtype)
            for k, v in base.items()
            if k != "pos_ids"
        }
        m["pos_ids"] = base["pos_ids"]
        fts.append(m)
    return base, fts


def _write(tmp_path, base, fts):
    st.save(tmp_path / "base.safetensors", base)
    paths = []
    for i, m in enumerate(fts):
        paths.append(tmp_path / f"ft{i}.safetensors")
        st.save(paths[-1], m)
    return tmp_path / "base.safetensors", paths


def _ref_ties(base, fts, density, merge, scale):
    keys = [k for k in base if k != "pos_ids"]
    taus = [
        np.concatenate(
            [(m[k].astype(np.float32) - base[k].astype(np.float32)).ravel() for k in keys]
        )
        for m in fts
    ]
    trimmed = []
    for tau in taus:
        # The TIES code's topk_values_mask: keep |tau| >= the (d - int(d * K))-th smallest
        # magnitude (1-based); density 1, where that rank is 0, keeps everything.
        k = tau.size - int(tau.size * density)
        thr = np.sort(np.abs(tau))[max(k, 1) - 1]
        trimmed.append(np.where(np.abs(tau) >= thr, tau, 0))
    trimmed = np.stack(trimmed)
    s = np.sign(trimmed.sum(0))
    s[s == 0] = np.sign(s.sum())
    out = np.zeros(trimmed.shape[1])
    for p in range(trimmed.shape[1]):  # slow per-coordinate loop
        vals = [v for v in trimmed[:, p] if (v > 0 if s[p] > 0 else v < 0)]
        if vals:
            out[p] = np.mean(vals) if merge == "mean" else np.sum(vals)
    res, i = {}, 0
    for k in keys:
        n = base[k].size
        res[k] = base[k].astype(np.float32) + scale * out[i : i + n].reshape(base[k].shape)
        i += n
    return res


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_streaming_ties_equals_reference(rng, tmp_path, merge, density):
    base, fts = _models(rng)
    b, paths = _write(tmp_path, base, fts)
    out = merge_safetensors(
        b,
        paths,
        tmp_path / "out.safetensors",
        method="ties",
        density=density,
        merge=merge,
        scale=0.7,
    )
    got = st.load(out)
    want = _ref_ties(base, fts, density, merge, 0.7)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["pos_ids"], base["pos_ids"])


def test_streaming_task_arithmetic_and_average(rng, tmp_path):
    base, fts = _models(rng, dtype=np.float16)
    b, paths = _write(tmp_path, base, fts)
    out = st.load(
        merge_safetensors(b, paths, tmp_path / "ta.safetensors", scale=0.3, exclude=["^head"])
    )
    for k in ("enc.w", "enc.b"):
        want = base[k].astype(np.float32) + 0.3 * sum(
            m[k].astype(np.float32) - base[k].astype(np.float32) for m in fts
        )
        assert out[k].dtype == np.float16
        np.testing.assert_allclose(out[k].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(out["head.w"], base["head.w"])  # excluded keeps the base
    avg = st.load(
        merge_safetensors(
            b, paths, tmp_path / "avg.safetensors", method="average", weights=[1, 0, 1]
        )
    )
    want = (fts[0]["enc.w"].astype(np.float32) + fts[2]["enc.w"].astype(np.float32)) / 2
    np.testing.assert_allclose(avg["enc.w"].astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_streaming_bad_input(rng, tmp_path):
    base, fts = _models(rng)
    b, paths = _write(tmp_path, base, fts)
    with pytest.raises(ValueError, match="method"):
        merge_safetensors(b, paths, tmp_path / "o", method="magic")
    with pytest.raises(ValueError, match="density"):
        merge_safetensors(b, paths, tmp_path / "o", method="ties", density=0.0)
    with pytest.raises(ValueError, match="empty"):
        merge_safetensors(b, [], tmp_path / "o")
    bad = dict(fts[0])
    bad["enc.w"] = bad["enc.w"][:5]
    st.save(tmp_path / "bad.safetensors", bad)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*enc\.w"):
        merge_safetensors(b, [paths[0], tmp_path / "bad.safetensors"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_streaming_ties_equals_in_memory_ties(rng, tmp_path, merge):
    import jax.numpy as jnp

    from cljax.merging import ties

    base, fts = _models(rng, T=4)
    b, paths = _write(tmp_path, base, fts)
    got = st.load(
        merge_safetensors(
            b, paths, tmp_path / "o.safetensors", method="ties", density=0.3, merge=merge, scale=0.9
        )
    )
    pre = {k: jnp.asarray(v) for k, v in base.items()}
    tvs = [
        {k: jnp.asarray(m[k]) - pre[k] if k != "pos_ids" else jnp.zeros_like(pre[k]) for k in base}
        for m in fts
    ]
    want = ties(pre, tvs, density=0.3, merge=merge, scale=0.9)
    for k in base:
        np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-5, atol=1e-6)
