"""CLIP's byte-level BPE tokenizer: encoding with ``vocab.json``/``merges.txt``, and training.

Encoding follows OpenAI CLIP's ``simple_tokenizer.py`` as Hugging Face ``CLIPTokenizer`` runs
it without ``ftfy``: lower-case, collapse whitespace, split into words, numbers (one digit a
token) and punctuation runs, map each word's UTF-8 bytes to printable characters, mark the
word's last symbol with ``</w>`` and apply the merges in rank order. Ids are framed by
``<|startoftext|>`` and ``<|endoftext|>`` and padded with ``<|endoftext|>``, as Hugging Face
pads CLIP. The files are the Hugging Face ones, so ``transformers.CLIPTokenizer`` loads the
same folder and gives the same ids (checked in ``make parity``).

:func:`train_bpe` learns merges from word counts (Sennrich et al., 2016): repeatedly merge
the most frequent adjacent pair, ties broken by the pair itself, so the result is
deterministic.

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
  2021 (github.com/openai/CLIP, ``clip/simple_tokenizer.py``).
  Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units", ACL 2016.
"""

from __future__ import annotations

import collections
import functools
import html
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["BOS", "EOS", "CLIPTokenizer", "bytes_to_unicode", "pre_tokenize", "train_bpe"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# CLIP's pattern with \p{L} as [^\W\d_] and \p{N} as \d (Python's re has no \p classes).
_PATTERN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
    re.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def pre_tokenize(text: str) -> list[str]:
    """The words of ``text`` as CLIP splits them, each in byte-mapped characters."""
    enc = bytes_to_unicode()
    return ["".join(enc[b] for b in w.encode("utf-8")) for w in _PATTERN.findall(_clean(text))]


def _initial_vocab() -> list[str]:
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def train_bpe(texts: Iterable[str], *, num_merges: int) -> list[tuple[str, str]]:
    """Learns up to ``num_merges`` BPE merges from ``texts`` (fewer when no pair repeats).

    Args:
      texts: training text (e.g. captions); duplicates count.
      num_merges: the most merges to learn.

    Returns:
      The merges in rank order, as pairs of symbols (``("t", "h</w>")``).

    Raises:
      ValueError: if ``num_merges`` is negative.
    """
    if int(num_merges) < 0:
        raise ValueError(f"{num_merges=} must be non-negative")
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for text in texts:
        for w in pre_tokenize(text):
            if w in (BOS, EOS):
                continue
            counts[(*w[:-1], w[-1] + "</w>")] += 1
    words = dict(counts)
    merges: list[tuple[str, str]] = []
    for _ in range(int(num_merges)):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, c in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < 2:
            break
        a, b = best[0]
        merges.append((a, b))
        merged = {}
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


class CLIPTokenizer:
    """Encodes text to CLIP token ids with a BPE vocabulary (Hugging Face file layout).

    Args:
      vocab: token -> id (``vocab.json``); must contain every byte symbol, its ``</w>`` form,
        every merge result, ``<|startoftext|>`` and ``<|endoftext|>``.
      merges: the merges in rank order.
      context_length: ids are truncated (keeping ``<|endoftext|>`` last) and padded to it.

    Example::

      tok = CLIPTokenizer.from_pretrained(embedded_checkpoint())
      ids, mask = tok(["a photo of a red circle."])
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        context_length: int = 77,
    ):
        missing = [t for t in (BOS, EOS) if t not in vocab]
        if missing:
            raise ValueError(f"vocab lacks the special tokens {missing}")
        if int(context_length) < 2:
            raise ValueError(f"{context_length=} must be at least 2 (start and end tokens)")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.context_length = int(context_length)
        self.bos_id, self.eos_id = self.vocab[BOS], self.vocab[EOS]
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def build(cls, merges: Sequence[tuple[str, str]], *, context_length: int = 77) -> CLIPTokenizer:
        """A tokenizer whose vocab is CLIP's layout: bytes, ``</w>`` bytes, merges, BOS, EOS.

        The special tokens get the two highest ids, as in CLIP, so the end of text is also
        the argmax of a row of ids.
        """
        tokens = _initial_vocab() + ["".join(m) for m in merges]
        if len(set(tokens)) != len(tokens):
            raise ValueError("merges produce a symbol twice; train them with train_bpe")
        tokens += [BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges, context_length=context_length)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, context_length: int | None = None):
        """Loads ``vocab.json``, ``merges.txt`` and (if present) ``tokenizer_config.json``."""
        d = Path(directory)
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(ln.split()) for ln in lines if ln and not ln.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(
                f"{d / 'merges.txt'}: a merge line must hold two symbols, got {bad[0]}"
            )
        if context_length is None:
            cfg = d / "tokenizer_config.json"
            context_length = 77
            if cfg.is_file():
                context_length = int(json.loads(cfg.read_text()).get("model_max_length", 77))
        pairs = [(a, b) for a, b in merges]  # each is a pair (checked above)
        return cls(vocab, pairs, context_length=context_length)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the Hugging Face tokenizer files (vocab, merges, configs)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        special = {
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": EOS,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "do_lower_case": True,
            "errors": "replace",
            **special,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [
                (self.ranks.get(p, 1 << 62), i)
                for i, p in enumerate(zip(symbols, symbols[1:], strict=False))
            ]
            rank, i = min(pairs)
            if rank == 1 << 62:
                break
            a, b = symbols[i], symbols[i + 1]
            out, j = [], 0
            while j < len(symbols):  # merge every occurrence of the pair, left to right
                if j + 1 < len(symbols) and symbols[j] == a and symbols[j + 1] == b:
                    out.append(a + b)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            symbols = out
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """The ids of one text, framed by start and end tokens, not padded or truncated."""
        ids = [self.bos_id]
        for w in pre_tokenize(text):
            if w in (BOS, EOS):
                ids.append(self.vocab[w])
                continue
            ids.extend(self.vocab[s] for s in self._bpe(w))
        ids.append(self.eos_id)
        return ids

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``: int32 ``[N, context_length]``, padded with the end token.

        Longer texts are truncated with the end token kept last, as CLIP's ``tokenize(...,
        truncate=True)`` does.
        """
        if isinstance(texts, str):
            texts = [texts]
        n, length = len(texts), self.context_length
        ids = np.full((n, length), self.eos_id, np.int32)
        mask = np.zeros((n, length), np.int32)
        for i, t in enumerate(texts):
            row = self.encode(t)
            if len(row) > length:
                row = [*row[: length - 1], self.eos_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids`` (start, end and padding tokens dropped), words space-separated."""
        inverse = {i: t for t, i in self.vocab.items()}
        dec = {c: b for b, c in bytes_to_unicode().items()}
        out = bytearray()
        for i in ids:
            if int(i) in (self.bos_id, self.eos_id):
                continue
            token = inverse[int(i)]
            end = token.endswith("</w>")
            out.extend(dec[c] for c in (token[:-4] if end else token))
            if end:
                out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)
