import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import clip


def _encoder(rng, dim=6):
    table = {}

    def encode(texts):
        out = []
        for t in texts:
            if t not in table:
                table[t] = rng.normal(size=dim)
            out.append(table[t])
        return jnp.asarray(np.stack(out), jnp.float32)

    encode.table = table
    encode.calls = 0
    return encode


def test_head_matches_slow_reference(rng):
    enc = _encoder(rng)
    classes, templates = ["cat", "dog", "eel"], ["a {}.", "the {} here.", "{}!"]
    head = clip.zero_shot_head(enc, classes, templates, logit_scale=100.0)
    assert head["kernel"].shape == (6, 3)
    for j, c in enumerate(classes):
        rows = [enc.table[t.format(c)] / np.linalg.norm(enc.table[t.format(c)]) for t in templates]
        m = np.mean(rows, axis=0)
        np.testing.assert_allclose(head["kernel"][:, j], 100 * m / np.linalg.norm(m), rtol=1e-5)
    feats = rng.normal(size=(4, 6)).astype(np.float32)
    want = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ np.asarray(head["kernel"])
    np.testing.assert_allclose(clip.head_logits(head, jnp.asarray(feats)), want, rtol=1e-5)


def test_head_encodes_whole_classes_in_few_calls(rng, monkeypatch):
    """Prompts go to the encoder in chunks of whole classes, and the head is the same."""
    from cljax.models import _heads

    monkeypatch.setattr(_heads, "_PROMPTS_PER_CALL", 7)  # 2 classes of 3 templates a call
    enc = _encoder(rng)
    sizes = []

    def counted(texts):
        sizes.append(len(texts))
        return enc(texts)

    classes, templates = [f"c{i}" for i in range(5)], ["a {}.", "the {}.", "{}!"]
    head = clip.zero_shot_head(counted, classes, templates)
    assert sizes == [6, 6, 3]
    for j, c in enumerate(classes):
        rows = [enc.table[t.format(c)] / np.linalg.norm(enc.table[t.format(c)]) for t in templates]
        m = np.mean(rows, axis=0)
        np.testing.assert_allclose(head["kernel"][:, j], 100 * m / np.linalg.norm(m), rtol=1e-5)
    with pytest.raises(ValueError, match="one embedding row per prompt"):
        clip.zero_shot_head(lambda t: enc(t)[:1], classes, templates)


def test_head_cache(rng, tmp_path):
    enc = _encoder(rng)
    calls = []
    counting = lambda t: calls.append(len(t)) or enc(t)
    a = clip.zero_shot_head(counting, ["a", "b"], ["x {}"], cache_dir=tmp_path, cache_key="m")
    n = len(calls)
    b = clip.zero_shot_head(counting, ["a", "b"], ["x {}"], cache_dir=tmp_path, cache_key="m")
    assert len(calls) == n  # second call read the cache
    np.testing.assert_array_equal(a["kernel"], b["kernel"])
    clip.zero_shot_head(counting, ["a", "b"], ["x {}"], cache_dir=tmp_path, cache_key="other")
    assert len(calls) > n


def test_head_bad_input(rng):
    enc = _encoder(rng)
    with pytest.raises(ValueError, match=r"templates\[1\]"):
        clip.zero_shot_head(enc, ["a"], ["ok {}", "no placeholder"])
    with pytest.raises(ValueError, match="classnames is empty"):
        clip.zero_shot_head(enc, [], ["{}"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        clip.zero_shot_head(enc, ["a"], "a {}")
    assert all(t.count("{}") == 1 for ts in clip.TEMPLATES.values() for t in ts)


def test_eight_task_templates_are_clips_full_lists():
    """The 8-task benchmark evaluates with CLIP's whole template list of each dataset."""
    from cljax.models._heads import TEMPLATES, _check_templates

    counts = {"cars": 8, "dtd": 8, "eurosat": 3, "gtsrb": 3, "mnist": 1, "resisc45": 18}
    counts |= {"sun397": 2, "svhn": 1}
    assert {k: len(TEMPLATES[k]) for k in counts} == counts
    assert "aerial view of the {}." in TEMPLATES["resisc45"]
    assert "a photo of the {} object." in TEMPLATES["dtd"]
    for k, v in TEMPLATES.items():
        _check_templates(v)  # exactly one {} each
        assert len(set(v)) == len(v), f"{k}: duplicate templates"


def _flip_data_byte(path):
    b = bytearray(path.read_bytes())
    b[b.index(b"\x93NUMPY") + 128 + 1] ^= 0x5A  # in the first array's data (.npy header: 128)
    path.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "damage",
    {
        "truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "flip byte": _flip_data_byte,
        "empty": lambda p: p.write_bytes(b""),
        "delete": lambda p: p.unlink(),
    }.items(),
    ids=lambda d: d[0],
)
def test_damaged_head_cache_is_moved_aside_and_rebuilt(rng, tmp_path, damage):
    enc = _encoder(rng)
    kw = dict(cache_dir=tmp_path, cache_key="m")
    a = clip.zero_shot_head(enc, ["a", "b"], ["x {}"], **kw)
    (path,) = tmp_path.glob("head-*.npz")
    name, fn = damage
    fn(path)
    if name == "delete":
        b = clip.zero_shot_head(enc, ["a", "b"], ["x {}"], **kw)
    else:
        with pytest.warns(
            UserWarning, match=r"damaged head cache.*moved it aside to .*\.corrupt-1"
        ):
            b = clip.zero_shot_head(enc, ["a", "b"], ["x {}"], **kw)
        assert path.with_name(path.name + ".corrupt-1").is_file()  # kept, not deleted
    np.testing.assert_array_equal(a["kernel"], b["kernel"])
    np.testing.assert_array_equal(a["bias"], b["bias"])
    c = clip.zero_shot_head(enc, ["a", "b"], ["x {}"], **kw)  # the rebuilt cache reads back
    np.testing.assert_array_equal(a["kernel"], c["kernel"])
