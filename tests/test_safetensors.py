import ml_dtypes
import numpy as np
import pytest

from cljax import safetensors as st


def _tensors(rng):
    return {
        "a.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d": rng.normal(size=(2, 2)).astype(np.float16),
        "scalar": np.array(2.5, np.float32),
    }


def test_round_trip_all_dtypes(rng, tmp_path):
    t = _tensors(rng)
    st.save(tmp_path / "x.safetensors", t, metadata={"format": "pt"})
    with st.SafetensorsReader(tmp_path / "x.safetensors") as r:
        assert r.keys() == list(t)
        assert r.metadata == {"format": "pt"}
        for k, v in t.items():
            got = r.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            np.testing.assert_array_equal(
                got.reshape(-1).view(np.uint8), v.reshape(-1).view(np.uint8)
            )
    assert not (tmp_path / "x.safetensors.part").exists()


def test_compatible_with_the_reference_library(rng, tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    t = {k: v for k, v in _tensors(rng).items() if v.dtype != ml_dtypes.bfloat16}
    st.save(tmp_path / "ours.safetensors", t)
    theirs = sn.load_file(str(tmp_path / "ours.safetensors"))
    for k in t:
        np.testing.assert_array_equal(theirs[k], t[k])
    sn.save_file(t, str(tmp_path / "theirs.safetensors"))
    ours = st.load(tmp_path / "theirs.safetensors")
    for k in t:
        np.testing.assert_array_equal(ours[k], t[k])


def test_corrupt_files_are_named(rng, tmp_path):
    f = tmp_path / "m.safetensors"
    st.save(f, _tensors(rng))
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(st.SafetensorsError, match=r"m\.safetensors.*truncated"):
        st.load(f)
    f.write_bytes(b"\x01")
    with pytest.raises(st.SafetensorsError, match="too short"):
        st.load(f)
    f.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(st.SafetensorsError, match="header length"):
        st.load(f)


def test_writer_enforces_the_declared_layout(tmp_path):
    w = st.SafetensorsWriter(
        tmp_path / "w.safetensors", [("a", (2,), np.float32), ("b", (1,), np.float32)]
    )
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        w.write("b", np.zeros(1, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="only 1 of 2"):
        w.close()
    assert not (tmp_path / "w.safetensors").exists()
