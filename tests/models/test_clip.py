"""CLIP: the Flax model and its Hugging Face converters.

Parity is checked two ways: against a slow numpy implementation written from the Hugging Face
state dict (always runs), and against transformers' PyTorch ``CLIPModel`` (runs where torch
and transformers are installed: ``make parity``).
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import safetensors as st
from cljax.models import clip
from experiments._common import tiny_clip_config

CFG = tiny_clip_config(vision_layers=2)  # the experiments' tiny CLIP


def _init(model, seed=0):
    """Random params of the model's shapes (eval_shape: nothing to compile)."""
    images = jnp.zeros((1, 32, 32, 3))
    if isinstance(model, clip.CLIP):
        shapes = jax.eval_shape(
            model.init, jax.random.key(0), images, jnp.zeros((1, 16), jnp.int32)
        )["params"]
    else:
        shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(r.normal(scale=0.2, size=s.shape), s.dtype), shapes)


def _encode_image(model, params, images):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip.CLIP.encode_image))(
        params, images
    )


def _encode_text(model, params, ids):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip.CLIP.encode_text))(
        params, ids
    )


def _randomize(params, rng):
    # fresh values per test; non-trivial LayerNorm scales/biases so that every leaf matters
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(scale=0.2, size=x.shape), x.dtype), params)


# ---------------------------------------------------------------- slow numpy reference


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _layer(sd, pre, x, heads, mask=None):
    def lin(name, h):
        return h @ sd[f"{pre}.{name}.weight"].T + sd[f"{pre}.{name}.bias"]

    h = _ln(x, sd[f"{pre}.layer_norm1.weight"], sd[f"{pre}.layer_norm1.bias"])
    q, k, v = lin("self_attn.q_proj", h), lin("self_attn.k_proj", h), lin("self_attn.v_proj", h)
    n, d = x.shape
    hd = d // heads
    out = np.zeros_like(x)
    for i in range(heads):  # one head at a time, unlike the vectorised model
        s = slice(i * hd, (i + 1) * hd)
        a = (q[:, s] / np.sqrt(hd)) @ k[:, s].T
        if mask is not None:
            a = np.where(mask, a, -np.inf)
        a = np.exp(a - a.max(-1, keepdims=True))
        out[:, s] = (a / a.sum(-1, keepdims=True)) @ v[:, s]
    x = x + lin("self_attn.out_proj", out)
    h = _ln(x, sd[f"{pre}.layer_norm2.weight"], sd[f"{pre}.layer_norm2.bias"])
    h = lin("mlp.fc1", h)
    h = h / (1 + np.exp(-1.702 * h))  # quick gelu
    return x + lin("mlp.fc2", h)


def _numpy_image_embed(sd, image, cfg):
    v = cfg.vision
    P = v.patch_size
    g = v.image_size // P
    w = sd["vision_model.embeddings.patch_embedding.weight"]  # [D, 3, P, P]
    patches = []
    for r in range(g):
        for c in range(g):
            patch = image[r * P : (r + 1) * P, c * P : (c + 1) * P, :]  # [P, P, 3]
            patches.append(np.einsum("dcij,ijc->d", w, patch))
    x = np.concatenate([sd["vision_model.embeddings.class_embedding"][None], np.stack(patches)])
    x = x + sd["vision_model.embeddings.position_embedding.weight"]
    x = _ln(x, sd["vision_model.pre_layrnorm.weight"], sd["vision_model.pre_layrnorm.bias"])
    for i in range(v.num_layers):
        x = _layer(sd, f"vision_model.encoder.layers.{i}", x, v.num_heads)
    pooled = _ln(
        x[0], sd["vision_model.post_layernorm.weight"], sd["vision_model.post_layernorm.bias"]
    )
    return sd["visual_projection.weight"] @ pooled


def _numpy_text_embed(sd, ids, cfg):
    t = cfg.text
    x = (
        sd["text_model.embeddings.token_embedding.weight"][ids]
        + sd["text_model.embeddings.position_embedding.weight"][: len(ids)]
    )
    mask = np.tril(np.ones((len(ids), len(ids)), bool))
    for i in range(t.num_layers):
        x = _layer(sd, f"text_model.encoder.layers.{i}", x, t.num_heads, mask)
    x = _ln(x, sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"])
    return sd["text_projection.weight"] @ x[int(np.argmax(ids))]


@pytest.mark.slow
def test_flax_clip_matches_numpy_reference_via_hf_state_dict(rng, tmp_path):
    model = clip.CLIP(CFG)
    params = _randomize(_init(model), rng)
    sd = {k: np.asarray(v, np.float64) for k, v in clip.to_hf_state_dict(params).items()}
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(0, 98, size=(2, 16)).astype(np.int32)
    ids[:, 9] = 98  # the end-of-text token has the largest id
    img = _encode_image(model, params, images)
    txt = _encode_text(model, params, ids)
    for i in range(2):
        np.testing.assert_allclose(
            img[i], _numpy_image_embed(sd, images[i].astype(np.float64), CFG), rtol=2e-4, atol=2e-5
        )
        np.testing.assert_allclose(txt[i], _numpy_text_embed(sd, ids[i], CFG), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_safetensors_round_trip_is_bit_exact(rng, tmp_path):
    model = clip.CLIP(CFG)
    params = _randomize(_init(model), rng)
    clip.save_hf_pretrained(params, CFG, tmp_path / "m")
    back = clip.load_hf_safetensors(tmp_path / "m", model)
    chex.assert_trees_all_equal(back, params)
    cfg = clip.config_from_hf(json.loads((tmp_path / "m" / "config.json").read_text()))
    assert cfg == CFG
    # the image-encoder half of a full checkpoint loads into CLIPImageEncoder
    enc = clip.load_hf_safetensors(tmp_path / "m", clip.CLIPImageEncoder(CFG))
    chex.assert_trees_all_equal(enc["vision_model"], params["vision_model"])
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    a = jax.jit(clip.CLIPImageEncoder(CFG).apply)({"params": enc}, images)
    b = _encode_image(model, params, images)
    chex.assert_trees_all_close(a, b, rtol=1e-6)


def test_checkpoint_mismatches_are_listed(rng, tmp_path):
    model = clip.CLIP(CFG)
    sd = clip.to_hf_state_dict(_init(model))
    sd.pop("visual_projection.weight")
    sd["vision_model.extra.weight"] = np.zeros(3, np.float32)
    sd["text_projection.weight"] = np.zeros((5, 5), np.float32)
    sd["text_model.embeddings.position_ids"] = np.arange(16)[None]  # a buffer, ignored
    with pytest.raises(clip.CheckpointMismatchError) as e:
        clip.from_hf_state_dict(sd, model)
    msg = str(e.value)
    assert "missing keys (1): ['visual_projection.weight']" in msg
    assert "vision_model.extra.weight" in msg
    assert "text_projection.weight: checkpoint (5, 5)" in msg


def test_corrupt_safetensors_is_named(rng, tmp_path):
    model = clip.CLIP(CFG)
    clip.save_hf_pretrained(_init(model), CFG, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(st.SafetensorsError, match="model.safetensors"):
        clip.load_hf_safetensors(tmp_path, model)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(st.SafetensorsError, match="not valid JSON"):
        clip.load_hf_safetensors(f, model)
    with pytest.raises(FileNotFoundError):
        clip.load_hf_safetensors(tmp_path / "nope.safetensors", model)


def test_configs_and_quick_gelu():
    b32 = clip.clip_config("ViT-B/32")
    assert (
        b32.vision.patch_size == 32
        and b32.vision.hidden_act == "quick_gelu"
        and b32.projection_dim == 512
    )
    l14 = clip.clip_config("ViT-L/14")
    assert (
        l14.vision.hidden_size == 1024
        and l14.vision.num_layers == 24
        and l14.text.hidden_size == 768
    )
    with pytest.raises(ValueError, match="is not a known CLIP config"):
        clip.clip_config("ViT-H/99")
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPVisionConfig(hidden_act="relu")
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(
        clip.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6
    )


# ---------------------------------------------------------------- PyTorch parity


def _hf_config(transformers):
    v, t = CFG.vision, CFG.text
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            max_position_embeddings=t.max_position_embeddings,
            hidden_act="quick_gelu",
            eos_token_id=2,
        ),
        vision_config=dict(
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            hidden_act="quick_gelu",
        ),
        projection_dim=CFG.projection_dim,
    )


def test_parity_with_pytorch_clip(rng, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.CLIPModel(_hf_config(transformers)).eval()
    with torch.no_grad():  # randomise LayerNorms too, so every parameter matters
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = clip.CLIP(CFG)
    params = clip.load_hf_safetensors(tmp_path / "hf", model)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(0, 98, size=(3, 16)).astype(np.int64)
    ids[:, 11] = 98
    with torch.no_grad():
        out = ref(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
        )
        want_img = ref.get_image_features(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))
        )
        want_txt = ref.get_text_features(input_ids=torch.from_numpy(ids))
    want_img = getattr(want_img, "pooler_output", want_img).numpy()
    want_txt = getattr(want_txt, "pooler_output", want_txt).numpy()
    img = np.asarray(model.apply({"params": params}, images, method=clip.CLIP.encode_image))
    txt = np.asarray(
        model.apply({"params": params}, ids.astype(np.int32), method=clip.CLIP.encode_text)
    )
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(img, want_img) <= 1e-5
    assert rel(txt, want_txt) <= 1e-5
    logits, _, _ = model.apply({"params": params}, images, ids.astype(np.int32))
    assert rel(np.asarray(logits), out.logits_per_image.numpy()) <= 1e-5
    # export back: PyTorch loads what cljax writes and computes the same features
    clip.save_hf_pretrained(params, CFG, tmp_path / "back")
    back = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        again = back.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    again = getattr(again, "pooler_output", again).numpy()
    assert rel(again, want_img) <= 1e-6
