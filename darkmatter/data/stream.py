"""Contexts from a document stream read once, in bounded memory, stopping at the token budget.

A corpus that cannot be held in memory (a Hugging Face dataset such as the Pile) is read as a stream. The split
rule is the one of :mod:`darkmatter.data.corpus`: a document goes to eval when its seeded hash falls below
``eval_fraction``, whatever the other documents. The order cannot be a global sort by that hash without reading
everything, so the stream is cut into consecutive *windows* of ``window`` documents and each window's documents
are ordered by the hash, split by split (a seeded shuffle within each window). Each split's contexts are cut
from its documents in that order until it holds the number of contexts requested; reading stops after the window
in which the last split filled up. Memory is one window of documents plus the output contexts, whatever the
size of the stream; a stream that fits in one window gives exactly the contexts of the in-memory path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import polars as pl

from darkmatter.config import CorpusConfig
from darkmatter.data.corpus import (
    ContextCutter,
    CorpusError,
    Document,
    bos_token,
    corpus_documents,
    make_contexts,
    split_block,
    split_documents,
    token_batches,
)

SPLITS = ("train", "eval")


def windows(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    """Consecutive lists of ``size`` documents (the last one shorter), never more than one in memory."""
    it = iter(docs)
    while True:
        block = list(islice(it, size))
        if not block:
            return
        yield block
        del block  # dropped before the next window is read


def stream_contexts(
    docs: Iterable[Document], tokenizer, n_contexts: dict[str, int], context_size: int, eval_fraction: float,
    seed: int, window: int,
) -> tuple[dict[str, tuple[np.ndarray, pl.DataFrame]], dict]:
    """Read ``docs`` until each split (``train``, ``eval``) holds ``n_contexts[split]`` contexts, then stop.

    Returns ``{split: (tokens [n, context_size] int32, table (context, doc_id, chunk))}`` as
    :func:`darkmatter.data.corpus.make_contexts` does, and counts of what was read: per split, the documents
    of that split read from the stream (used or not), and the documents read in all. Raises
    :class:`CorpusError` when the stream ends before a split is full.
    """
    bos = bos_token(tokenizer)
    cutters = {s: ContextCutter(n_contexts[s], context_size, bos) for s in SPLITS}
    read = dict.fromkeys(SPLITS, 0)
    n_read = 0
    for block in windows(docs, window):
        splits, n = split_block(block, eval_fraction, seed)
        n_read += n
        for s in SPLITS:
            read[s] += len(splits[s])
            cutter = cutters[s]
            # token_batches tokenizes lazily: a split that fills up mid-window stops tokenizing there
            for doc, ids in token_batches(splits[s] if not cutter.full else [], tokenizer):
                cutter.add(doc.doc_id, ids)
                if cutter.full:
                    break
        del block, splits  # the window's texts are not kept while the next window is read
        if all(c.full for c in cutters.values()):
            break
    if n_read == 0:
        raise CorpusError("the corpus stream contains no documents.")
    for s in SPLITS:
        if not cutters[s].full:
            raise cutters[s].shortfall(s, read[s])
    counts = {s: {"documents": read[s]} for s in SPLITS} | {"stream": {"documents_read": n_read, "window": window}}
    return {s: cutters[s].result() for s in SPLITS}, counts


def is_streamed(cfg: CorpusConfig) -> bool:
    """A corpus with a Hugging Face source is streamed (all its sources, in the configured order)."""
    return any(source.startswith("hf:") for source in cfg.sources)


def corpus_contexts(
    cfg: CorpusConfig, tokenizer, n_contexts: dict[str, int], context_size: int
) -> tuple[dict[str, tuple[np.ndarray, pl.DataFrame]], dict]:
    """Each split's contexts and the counts of documents read: streamed (:func:`stream_contexts`) when the corpus
    has a Hugging Face source, else read whole and ordered globally by the hash (every document counted)."""
    if is_streamed(cfg):
        return stream_contexts(corpus_documents(cfg), tokenizer, n_contexts, context_size, cfg.eval_fraction, cfg.seed,
                               cfg.shuffle_window)
    splits = split_documents(cfg)
    out = {s: make_contexts(splits[s], tokenizer, n_contexts[s], context_size, s) for s in SPLITS}
    return out, {s: {"documents": len(d)} for s, d in splits.items()}
