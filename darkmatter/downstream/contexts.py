"""Which eval contexts the CE experiments splice: as many documents as the number of contexts allows, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from darkmatter.io import read_parquet


def context_subset(documents: Sequence[str], n: int, seed: int) -> np.ndarray:
    """``n`` eval contexts drawn across as many documents as possible (``documents[c]``: context c's document):
    documents in a seeded order, one context of each per round (each document's own contexts in a seeded order),
    until ``n`` are chosen. Sorted. Long documents give many correlated contexts; this spreads the CE experiment's
    tokens over the most independent units its size allows."""
    documents = np.asarray(documents).astype(str)
    if n >= len(documents):
        return np.arange(len(documents))
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(documents, return_inverse=True)
    queues = [rng.permutation(np.flatnonzero(inverse == d)).tolist() for d in rng.permutation(len(names))]
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return np.sort(np.array(chosen, dtype=np.int64))


def context_documents(contexts_parquet: Path, n_contexts: int) -> np.ndarray:
    """Each eval context's document id (the corpus step's {split}_contexts.parquet; a context without one is its
    own document)."""
    table = read_parquet(contexts_parquet, columns=["context", "doc_id"])
    docs = dict(zip(table["context"].to_list(), table["doc_id"].to_list(), strict=True))
    return np.array([docs.get(c) or f"context {c}" for c in range(n_contexts)], dtype=object)


def _contexts_of(tokens_path: Path) -> Path:
    """{split}_contexts.parquet beside {split}_tokens.npy (darkmatter.paths)."""
    return tokens_path.with_name(tokens_path.name.replace("_tokens.npy", "_contexts.parquet"))


def spliced_contexts(tokens_path: Path, n_contexts: int, n: int, seed: int) -> np.ndarray:
    """The ``n`` contexts (of the split's ``n_contexts``, tokens at ``tokens_path``) that every CE step splices:
    :func:`context_subset` over the documents of {split}_contexts.parquet."""
    return context_subset(context_documents(_contexts_of(tokens_path), n_contexts), n, seed)
