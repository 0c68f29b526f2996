"""What an embedder is, told by its answers: vectors of a fixed probe set.

A remote model has no weights here to hash, and a name says nothing about what a URL serves
today. Its vectors of `PROBES` do: the collection manifest records them (rounded, with their
hash), and a collection is only queried or written with an embedder whose probe vectors match.
A bare hash of rounded floats would flip whenever one of thousands of values sits near a
rounding boundary and the server's numerics move it across (another batch size, bf16 on other
hardware), refusing the very model that built the index; so an equal hash is a match, and
otherwise the vectors are compared: every probe's cosine similarity at least `MIN_COSINE`.
Different models are far apart (unrelated vectors are near-orthogonal), the same model under
float noise is not. A local model is named by the hash of its files; its probe vectors tell how
far another numeric path (bf16, int8) strays from the one that built an index.
"""

import hashlib

import numpy as np
from pydantic import BaseModel

PROBES = (
    "twostage fingerprint probe",
    "Debian is a free operating system for your computer.",
    "Instruct: Given a web search query, retrieve relevant passages\nQuery:what is BM25?",
    "数据 ünïcödé 12345 <tag> & ☃",
)
KEPT_DIMS = 64  # of each probe vector, enough to tell models apart and small in the manifest
DECIMALS = 4
MIN_COSINE = 0.99


class Fingerprint(BaseModel):
    """Probe vectors (their first `KEPT_DIMS` values, rounded) and the hash of those values."""

    vectors: list[list[float]]
    sha256: str

    @classmethod
    def of(cls, vectors: np.ndarray) -> "Fingerprint":
        """From the (len(PROBES), dim) unit vectors the model gave for `PROBES`, in order."""
        kept = np.round(np.asarray(vectors, dtype=np.float64)[:, :KEPT_DIMS], DECIMALS) + 0.0  # no -0.0
        digest = hashlib.sha256(kept.astype("<f8").tobytes()).hexdigest()
        return cls(vectors=kept.tolist(), sha256=digest)

    def matches(self, other: "Fingerprint", min_cosine: float = MIN_COSINE) -> bool:
        return self.sha256 == other.sha256 or self.min_cosine(other) >= min_cosine

    def min_cosine(self, other: "Fingerprint") -> float:
        """The smallest cosine similarity between matching probe vectors (-1 when shapes differ)."""
        a, b = np.asarray(self.vectors), np.asarray(other.vectors)
        if a.shape != b.shape:
            return -1.0
        cosines = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return float(cosines.min())
