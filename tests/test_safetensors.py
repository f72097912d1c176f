import json
import struct

import ml_dtypes
import numpy as np
import pytest

from cljax import safetensors as st

ALL_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e5m2,
    ml_dtypes.float8_e4m3fn,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint64,
    np.uint32,
    np.uint16,
    np.uint8,
    np.bool_,
]


def _tensors(rng):
    return {
        "a.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d": rng.normal(size=(2, 2)).astype(np.float16),
        "scalar": np.array(2.5, np.float32),
    }


def _random_bits(rng, shape, dtype):
    """An array of ``dtype`` with random bit patterns (NaN payloads and all)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    n = int(np.prod(shape)) * dtype.itemsize
    return rng.integers(0, 256, size=n, dtype=np.uint8).view(dtype).reshape(shape)


def _every_dtype(rng):
    t = {f"t{i}.{np.dtype(d).name}": _random_bits(rng, (2, 3), d) for i, d in enumerate(ALL_DTYPES)}
    t["empty"] = np.zeros((0, 4), np.float32)
    t["scalar"] = np.array(-0.0, np.float64)
    return t


def _bits(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _file(tmp_path, header, data=b"", name="h.safetensors"):
    """A file of an 8-byte length, the header (text or bytes) as given, and ``data``."""
    raw = header.encode() if isinstance(header, str) else header
    f = tmp_path / name
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return f


def test_round_trip_all_dtypes(rng, tmp_path):
    t = _tensors(rng)
    st.save(tmp_path / "x.safetensors", t, metadata={"format": "pt"})
    with st.SafetensorsReader(tmp_path / "x.safetensors") as r:
        assert r.keys() == list(t)
        assert r.metadata == {"format": "pt"}
        for k, v in t.items():
            got = r.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            np.testing.assert_array_equal(_bits(got), _bits(v))
    assert not (tmp_path / "x.safetensors.part").exists()


def test_round_trip_is_bit_exact_for_every_dtype(rng, tmp_path):
    t = _every_dtype(rng)
    f = st.save(tmp_path / "x.safetensors", t, metadata={"k": 'v "quoted" [{,'})
    got = st.load(f)
    assert list(got) == list(t)
    for k, v in t.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(_bits(got[k]), _bits(v), err_msg=k)
    with st.SafetensorsReader(f) as r:
        assert r.metadata == {"k": 'v "quoted" [{,'}


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


def test_every_dtype_reads_as_the_reference_reads_it(rng, tmp_path):
    """Byte for byte, in both directions, against the Rust reader and writer."""
    sf = pytest.importorskip("safetensors")
    sn = pytest.importorskip("safetensors.numpy")
    t = _every_dtype(rng)
    f = st.save(tmp_path / "ours.safetensors", t, metadata={"format": "np"})
    theirs = dict(sf.deserialize(f.read_bytes()))
    assert set(theirs) == set(t)
    for k, v in t.items():
        assert theirs[k]["dtype"] == st._NAMES[v.dtype] and theirs[k]["shape"] == list(v.shape)
        assert bytes(theirs[k]["data"]) == v.tobytes(), k
    with sf.safe_open(str(f), framework="np") as g:
        assert g.metadata() == {"format": "np"}
    sn.save_file(t, str(tmp_path / "theirs.safetensors"), metadata={"m": "1"})
    with st.SafetensorsReader(tmp_path / "theirs.safetensors") as r:
        assert set(r.keys()) == set(t) and r.metadata == {"m": "1"}
        for k, v in t.items():
            got = r.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape, k
            np.testing.assert_array_equal(_bits(got), _bits(v), err_msg=k)


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


T2 = '"dtype":"U8","shape":[2],"data_offsets":[0,2]'
# (id, header, data, regex of our message); the reference rejects every one of them too,
# except those in STRICTER, where this reader is stricter than the reference on purpose.
MALFORMED = [
    (
        "shape_string",
        '{"a":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}}',
        b"xy",
        r"shape \['2'\] must be a list of non-negative integers",
    ),
    (
        "shape_float",
        '{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}',
        b"xy",
        r"shape \[2\.0\] must be",
    ),
    (
        "shape_exponent",
        '{"a":{"dtype":"U8","shape":[2e0],"data_offsets":[0,2]}}',
        b"xy",
        r"shape \[2\.0\] must be",
    ),
    (
        "shape_bool",
        '{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}',
        b"x",
        r"shape \[True\] must be",
    ),
    (
        "shape_negative",
        '{"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}',
        b"xy",
        r"shape \[-2\] must be",
    ),
    (
        "shape_not_list",
        '{"a":{"dtype":"U8","shape":2,"data_offsets":[0,2]}}',
        b"xy",
        r"shape 2 must be",
    ),
    (
        "shape_past_u64",
        '{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,2]}}',
        b"xy",
        "shape .* must be",
    ),
    (
        "shape_overflows",
        '{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}',
        b"",
        "overflows 64 bits",
    ),
    (
        "offsets_three",
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,2]}}',
        b"xy",
        r"data_offsets \[0, 2, 2\] must be two",
    ),
    (
        "offsets_float",
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2.0]}}',
        b"xy",
        "data_offsets .* must be two",
    ),
    (
        "offsets_bool",
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[false,true]}}',
        b"x",
        "data_offsets .* must be two",
    ),
    (
        "offsets_string",
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":"0,2"}}',
        b"xy",
        "data_offsets .* must be two",
    ),
    (
        "end_before_begin",
        '{"a":{' + T2 + '},"b":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}',
        b"xy",
        "end before begin",
    ),
    (
        "dtype_unknown",
        '{"a":{"dtype":"F7","shape":[2],"data_offsets":[0,2]}}',
        b"xy",
        "unknown dtype 'F7'",
    ),
    (
        "dtype_lowercase",
        '{"a":{"dtype":"u8","shape":[2],"data_offsets":[0,2]}}',
        b"xy",
        "unknown dtype 'u8'",
    ),
    (
        "dtype_not_string",
        '{"a":{"dtype":8,"shape":[2],"data_offsets":[0,2]}}',
        b"xy",
        "unknown dtype 8",
    ),
    ("missing_offsets", '{"a":{"dtype":"U8","shape":[2]}}', b"xy", r"lacks \['data_offsets'\]"),
    ("entry_not_object", '{"a":[0,2]}', b"xy", r"header entry is \[0, 2\], not an object"),
    (
        "byte_count",
        '{"a":{"dtype":"U16","shape":[3],"data_offsets":[0,4]}}',
        b"xyzw",
        r"spans 4 bytes .* need 6",
    ),
    (
        "gap_at_start",
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}',
        b"xyz",
        "end at byte 0; tensors must tile",
    ),
    (
        "gap_between",
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}',
        b"xyz",
        "'b' has data_offsets .* end at byte 1",
    ),
    (
        "overlap",
        '{"a":{' + T2 + '},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}',
        b"xyz",
        "'b' has data_offsets .* end at byte 2",
    ),
    (
        "duplicate_name",
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        b"xy",
        "key 'a' twice",
    ),
    (
        "duplicate_metadata",
        '{"__metadata__":{},"__metadata__":{},"a":{' + T2 + "}}",
        b"xy",
        "key '__metadata__' twice",
    ),
    (
        "duplicate_metadata_key",
        '{"__metadata__":{"k":"1","k":"2"},"a":{' + T2 + "}}",
        b"xy",
        "key 'k' twice",
    ),
    ("trailing_bytes", '{"a":{' + T2 + "}}", b"xyz", "cover 2 bytes of a data section of 3"),
    ("data_without_tensors", "{}", b"x", "cover 0 bytes of a data section of 1"),
    ("truncated", '{"a":{' + T2 + "}}", b"x", r"spans bytes \[0, 2\) of 1.*truncated"),
    (
        "metadata_int_value",
        '{"__metadata__":{"k":1},"a":{' + T2 + "}}",
        b"xy",
        r"__metadata__\['k'\] is 1, not a string",
    ),
    (
        "metadata_nested",
        '{"__metadata__":{"k":{"v":"w"}},"a":{' + T2 + "}}",
        b"xy",
        r"__metadata__\['k'\] is \{'v': 'w'\}, not a string",
    ),
    (
        "metadata_not_object",
        '{"__metadata__":"pt","a":{' + T2 + "}}",
        b"xy",
        "__metadata__ is 'pt', not an object",
    ),
    (
        "metadata_outside",
        '{"format":"pt","a":{' + T2 + "}}",
        b"xy",
        "tensor 'format': header entry is 'pt', not an object",
    ),
    ("not_an_object", "[]", b"", "header is a JSON list, not an object"),
    ("not_json", '{"a":', b"", "not valid JSON"),
    ("trailing_garbage", '{"a":{' + T2 + "}}x", b"xy", "not valid JSON"),
    (
        "nan",
        '{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,2]}}',
        b"xy",
        "NaN, which is not JSON",
    ),
    ("infinity", '{"__metadata__":{"k":Infinity}}', b"", "Infinity, which is not JSON"),
    ("not_utf8", b'{"\xff":{' + T2.encode() + b"}}", b"xy", "not UTF-8"),
    ("utf16", ('{"a":{' + T2 + "}}").encode("utf-16"), b"xy", "not UTF-8"),
    (
        "lone_surrogate",
        '{"\\ud800":{' + T2 + "}}",
        b"xy",
        "tensor name '\\\\ud800' is not valid Unicode",
    ),
    ("deep", '{"a":' + "[" * 100_000 + "]" * 100_000 + "}", b"", "nests more than 128 levels"),
]


STRICTER = {"duplicate_metadata_key"}  # serde's HashMap keeps the last of duplicate keys


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_headers_are_rejected_by_name(tmp_path, case):
    name, header, data, message = case
    f = _file(tmp_path, header, data, name="bad-header.safetensors")
    with pytest.raises(st.SafetensorsError, match=message) as e:
        st.SafetensorsReader(f)
    assert str(f) in str(e.value)
    # independent reference: the Rust reader rejects the same bytes
    sf = pytest.importorskip("safetensors")
    if name in STRICTER:
        sf.deserialize(f.read_bytes())
        return
    with pytest.raises(sf.SafetensorError):
        sf.deserialize(f.read_bytes())


def test_header_length_is_bounded(tmp_path):
    f = tmp_path / "long.safetensors"
    f.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(
        st.SafetensorsError, match=r"long\.safetensors: header length 100000001 exceeds"
    ):
        st.load(f)
    f.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(st.SafetensorsError, match="exceeds the format's limit"):
        st.load(f)
    f.write_bytes(struct.pack("<Q", 64) + b"{}")
    with pytest.raises(st.SafetensorsError, match="header length 64 does not fit the file of 10"):
        st.load(f)


def test_a_header_of_too_many_values_is_refused_unparsed(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "_MAX_VALUES", 1000)
    entries = [f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(200)]
    f = _file(tmp_path, "{" + ",".join(entries) + "}")

    def no_parse(*a, **k):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(st.json, "loads", no_parse)
    with pytest.raises(
        st.SafetensorsError, match=r"h\.safetensors: header holds about 1401 JSON values"
    ):
        st.load(f)
    monkeypatch.undo()
    assert len(st.load(f)) == 200  # within the real bound it reads


# Valid files the reference accepts, some unusual; ours must read them identically.
VALID = [
    ("empty", "{}", b""),
    ("only_metadata", '{"__metadata__":{"format":"pt"}}', b""),
    ("metadata_null", '{"__metadata__":null,"a":{' + T2 + "}}", b"xy"),
    ("whitespace", ' \n{ "a" : {' + T2 + "} }\t  ", b"xy"),
    ("extra_field", '{"a":{' + T2 + ',"extra":[1,{"x":2}]}}', b"xy"),
    (
        "out_of_order",
        '{"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"a":{' + T2 + "}}",
        b"xyz",
    ),
    (
        "zero_size_and_scalar",
        '{"z":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"y":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
        '"s":{"dtype":"I16","shape":[],"data_offsets":[0,2]}}',
        b"\x01\x02",
    ),
    (
        "odd_names",
        '{"a\\"[{,\\\\":{'
        + T2
        + '},"\\u00e9\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}',
        b"xyz",
    ),
]


@pytest.mark.parametrize("header,data", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_files_read_as_the_reference_reads_them(tmp_path, header, data):
    sf = pytest.importorskip("safetensors")
    f = _file(tmp_path, header, data)
    theirs = dict(sf.deserialize(f.read_bytes()))
    with sf.safe_open(str(f), framework="np") as g:
        their_meta = g.metadata() or {}
    with st.SafetensorsReader(f) as r:
        assert sorted(r.keys()) == sorted(theirs)
        assert r.metadata == their_meta
        for k, v in theirs.items():
            assert st._NAMES[r.dtype(k)] == v["dtype"] and list(r.shape(k)) == v["shape"]
            assert r.get(k).tobytes() == bytes(v["data"])


def test_random_header_corruptions_agree_with_the_reference(rng, tmp_path):
    """Differential: single-byte corruptions of a header are accepted or rejected exactly
    when the Rust reader accepts or rejects them, and accepted ones read identically."""
    sf = pytest.importorskip("safetensors")
    t = {"w": _random_bits(rng, (2, 3), np.float32), "b.x": _random_bits(rng, (4,), np.int16)}
    t["c"] = _random_bits(rng, (3,), ml_dtypes.bfloat16)
    good = st.save(tmp_path / "good.safetensors", t, metadata={"k": "v"}).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    alphabet = b'0123456789[]{},:"\\ \tx'
    f = tmp_path / "mutant.safetensors"
    outcomes = set()
    for _ in range(300):
        raw = bytearray(good)
        raw[8 + int(rng.integers(n))] = alphabet[int(rng.integers(len(alphabet)))]
        f.write_bytes(bytes(raw))
        try:
            theirs = dict(sf.deserialize(bytes(raw)))
        except sf.SafetensorError:
            theirs = None
        try:
            ours = st.load(f)
        except st.SafetensorsError as e:
            assert str(f) in str(e)
            ours = None
        assert (ours is None) == (theirs is None), bytes(raw[8 : 8 + n])
        if ours is not None:
            assert set(ours) == set(theirs)
            for k, v in theirs.items():
                assert ours[k].tobytes() == bytes(v["data"]), k
        outcomes.add(ours is None)
    assert outcomes == {True, False}  # the corruptions hit both kinds


def _depth_and_values(x):
    """The nesting depth of a JSON value and its values + empty containers (recursively)."""
    if isinstance(x, dict | list):
        items = list(x.values()) if isinstance(x, dict) else x
        sub = [_depth_and_values(v) for v in items]
        depth = 1 + max((d for d, _ in sub), default=0)
        return depth, len(items) + (not items) + sum(v for _, v in sub)
    return 0, 0


def _random_json(rng, depth=0):
    r = rng.random()
    if depth > 6 or r < 0.3:
        pieces = ['"', "\\", "[", "]", "{", "}", ",", "a", "é", "\\\\", '\\"']
        return "".join(rng.choice(pieces, size=int(rng.integers(0, 8))))
    if r < 0.4:
        return int(rng.integers(-5, 1000))
    if r < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {f"k{i}[,": _random_json(rng, depth + 1) for i in range(int(rng.integers(0, 4)))}


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 18])
def test_scan_counts_depth_and_values_like_the_parsed_tree(rng, monkeypatch, chunk):
    """The bracket scan (strings skipped, chunk boundaries anywhere) against the parsed tree."""
    monkeypatch.setattr(st, "_CHUNK", chunk)
    for _ in range(60):
        x = {"root": _random_json(rng)}
        text = json.dumps(
            x, ensure_ascii=bool(rng.integers(2)), indent=int(rng.integers(0, 2)) or None
        )
        depth, values = _depth_and_values(x)
        assert st._scan(text.encode()) == (depth, values + 1), text


def test_writer_refuses_what_could_not_be_read_back(tmp_path):
    f = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="cannot be named '__metadata__'"):
        st.save(f, {"__metadata__": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="tensor 'a' is declared twice"):
        st.SafetensorsWriter(f, [("a", (1,), np.float32), ("a", (1,), np.float32)])
    with pytest.raises(TypeError, match="metadata must map strings to strings; got 'epoch': 3"):
        st.save(f, {"a": np.zeros(2)}, metadata={"epoch": 3})
    with pytest.raises(ValueError, match=r"shape=\(2, -1\)"):
        st.SafetensorsWriter(f, [("a", (2, -1), np.float32)])
    with pytest.raises(ValueError, match="complex64 cannot be stored"):
        st.save(f, {"a": np.zeros(2, np.complex64)})
    with pytest.raises(st.SafetensorsError, match="not valid Unicode"):
        st.save(f, {"\ud800": np.zeros(2)})
    assert not f.exists() and not (tmp_path / "w.safetensors.part").exists()


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
