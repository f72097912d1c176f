"""Zero-shot classification heads from class names and prompt templates.

As ``src/heads.py`` of github.com/mlfoundations/task_vectors and ``src/models/zeroshot.py``
of github.com/mlfoundations/wise-ft: for each class, every template is filled with the
class name and embedded by the *pre-trained* text encoder; the embeddings are
L2-normalised, averaged, re-normalised and multiplied by the logit scale (100 for OpenAI
CLIP). The head L2-normalises image features before its linear map and has no bias. Heads
are frozen and never merged: always build them from the model you evaluate (a head
released for another model can have the wrong feature width, mlfoundations/task_vectors#20).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cljax.checkpoint import quarantine_file

__all__ = ["TEMPLATES", "head_logits", "zero_shot_head"]

# The prompt templates of CLIP's prompt engineering (Radford et al., 2021) for the 8 datasets
# of the task-arithmetic benchmark (the lists task_vectors and aTLAS evaluate with), and a few
# per dataset for MTIL's other datasets (MTIL trains and evaluates with one template each;
# pass its list explicitly for exact reproductions).
_RESISC45 = tuple(
    f"{kind} {view} of {article}{{}}."
    for article in ("", "a ", "the ")
    for kind, view in (
        ("satellite", "imagery"),
        ("aerial", "imagery"),
        ("satellite", "photo"),
        ("aerial", "photo"),
        ("satellite", "view"),
        ("aerial", "view"),
    )
)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "generic": ("a photo of a {}.", "a picture of a {}.", "an image of a {}."),
    "cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "dtd": tuple(
        f"a photo of {article} {{}} {kind}."
        for article in ("a", "the")
        for kind in ("texture", "pattern", "thing", "object")
    ),
    "eurosat": (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ),
    "gtsrb": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ),
    "mnist": ('a photo of the number: "{}".',),
    "resisc45": _RESISC45,
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "svhn": ('a photo of the number: "{}".',),
    "aircraft": ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
    "caltech101": ("a photo of a {}.", "a painting of a {}."),
    "cifar100": ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}."),
    "flowers": ("a photo of a {}, a type of flower.",),
    "food": ("a photo of {}, a type of food.",),
    "pets": ("a photo of a {}, a type of pet.",),
}


def _check_templates(templates: Sequence[str]) -> None:
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates={templates!r} must be a non-empty sequence of strings")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(
                f"templates[{i}]={t!r} must contain exactly one '{{}}' for the class name"
            )


_PROMPTS_PER_CALL = 256


def zero_shot_head(
    encode_text: Callable[[list[str]], jax.Array],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    logit_scale: float = 100.0,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str = "",
) -> dict[str, jax.Array]:
    """Builds a frozen linear head ``{"kernel": [D, C], "bias": [C]}`` from text embeddings.

    Args:
      encode_text: maps a list of strings to their embeddings ``[len, D]`` (tokenise and run
        the pre-trained text tower + projection; for CLIP, ``CLIP.encode_text``).
      classnames: the C class names.
      templates: prompt templates, each with exactly one ``{}``.
      logit_scale: multiplies the normalised class embeddings (``exp(logit_scale)`` of the
        checkpoint; 100 for OpenAI CLIP).
      cache_dir: if given, the head is stored there and reused by later calls with the same
        ``cache_key``, class names, templates and scale (a damaged cache file is moved
        aside, see :func:`cljax.checkpoint.quarantine_file`, and the head built again).
      cache_key: identifies the text encoder (e.g. the checkpoint name) in the cache.

    Returns:
      The head; apply it with :func:`head_logits`.

    Raises:
      ValueError: on an empty class list or a template without exactly one ``{}``.

    Example::

      head = zero_shot_head(lambda t: clip_text(tokenize(t)), ["cat", "dog"], TEMPLATES["generic"])
      logits = head_logits(head, image_features)

    References:
      Radford et al., 2021; Ilharco et al., "Editing Models with Task Arithmetic", 2023.
    """
    _check_templates(templates)
    classnames = list(classnames)
    if not classnames:
        raise ValueError("classnames is empty; a head needs at least one class")
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(
            json.dumps([cache_key, classnames, list(templates), float(logit_scale)]).encode()
        ).hexdigest()[:16]
        path = Path(cache_dir) / f"head-{digest}.npz"
        if path.is_file():
            try:
                with np.load(path) as f:
                    kernel, bias = np.asarray(f["kernel"]), np.asarray(f["bias"])
                if kernel.shape[1:] != (len(classnames),) or bias.shape != (len(classnames),):
                    raise ValueError(f"kernel {kernel.shape} and bias {bias.shape}")
                return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                quarantine_file(path, f"damaged head cache ({e}); building it again")
    # Every prompt of every class, encoded in chunks of whole classes of about
    # `_PROMPTS_PER_CALL` prompts: one call per class would run (and, with a padding
    # encoder, pad) a text-tower batch for each class.
    per_call = max(1, _PROMPTS_PER_CALL // len(templates))
    parts = []
    for s in range(0, len(classnames), per_call):
        prompts = [t.format(name) for name in classnames[s : s + per_call] for t in templates]
        emb = jnp.asarray(encode_text(prompts), jnp.float32)
        if emb.ndim != 2 or emb.shape[0] != len(prompts):
            raise ValueError(
                f"encode_text returned shape {emb.shape} for {len(prompts)} prompts; "
                "it must return one embedding row per prompt, [len(texts), D]"
            )
        parts.append(emb)
    emb = jnp.concatenate(parts).reshape(len(classnames), len(templates), -1)
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(axis=1)
    kernel = logit_scale * (mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)).T
    head = {"kernel": kernel, "bias": jnp.zeros((len(classnames),), jnp.float32)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of this writer's own: processes that build the same file at once (the workers
        # of one run) must not write into one temporary file.
        tmp = path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part.npz")
        np.savez(tmp, kernel=np.asarray(kernel), bias=np.asarray(head["bias"]))
        os.replace(tmp, path)
    return head


def head_logits(head: dict[str, jax.Array], features: jax.Array) -> jax.Array:
    """Logits of a zero-shot head: L2-normalise the image features, then the linear map."""
    f = features.astype(jnp.float32)
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    return f @ head["kernel"] + head["bias"]
