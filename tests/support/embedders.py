"""A deterministic embedder without a model, for the CMVK agreement tests and benchmark."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


class HashingEmbedder:
    """Deterministic character-trigram hashing embedder (no model), for tests."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vec = [0.0] * self.dim
            padded = f"  {text.lower()}  "
            for i in range(len(padded) - 2):
                h = int.from_bytes(hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest(), "big")
                vec[h % self.dim] += 1.0 if h & 1 << 31 else -1.0
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            out.append([v / norm for v in vec])
        return out
