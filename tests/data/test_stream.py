"""Streamed corpora: the budget met exactly, the split rule kept, a windowed seeded order checked against a
reference implementation, flat memory over 10⁶ documents, and one read through the `datasets` library."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest

from darkmatter.config import CorpusConfig
from darkmatter.data.corpus import (
    CorpusError,
    Document,
    doc_hash,
    hf_documents,
    make_contexts,
    split_block,
    split_documents,
)
from darkmatter.data.stream import corpus_contexts, stream_contexts

BOS = 1


class WordTokenizer:
    """One token per whitespace-separated word (id = the word's integer value + 2): lengths are known exactly.
    Token lists are cached per text, so that a stream repeating a text costs no tokenizer allocations."""

    bos_token_id = BOS

    def __init__(self):
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        out = []
        for t in texts:
            if t not in self.cache:
                self.cache[t] = [int(w) + 2 for w in t.split()]
            out.append(self.cache[t])
        return {"input_ids": out}


TOK = WordTokenizer()


def corpus(n: int, seed: int = 0) -> list[Document]:
    """Documents of 0 to 40 tokens (some blank) whose tokens encode (document, position)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 41, size=n)
    return [Document(f"doc{i}", " ".join(str(1000 * i + j) for j in range(k))) for i, k in enumerate(lengths)]


class Counting:
    """An iterator over documents that counts how many were taken from it."""

    def __init__(self, docs):
        self.docs, self.taken = iter(docs), 0

    def __iter__(self):
        return self

    def __next__(self):
        doc = next(self.docs)
        self.taken += 1
        return doc


def reference(docs: list[Document], n: dict[str, int], context_size: int, frac: float, seed: int, window: int):
    """The documented rule, written plainly: windows of `window` documents, each split hash-ordered within a
    window, contexts cut in that order; returns each split's (doc_id, chunk) list and the documents read."""
    body = context_size - 1
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "eval": []}
    for start in range(0, len(docs), window):
        block = [d for d in docs[start : start + window] if d.text.strip()]
        for split in rows:
            mine = [d for d in block if (doc_hash(d.doc_id, seed) < frac) == (split == "eval")]
            for d in sorted(mine, key=lambda d: (doc_hash(d.doc_id, seed), d.doc_id)):
                rows[split] += [(d.doc_id, c) for c in range(len(d.text.split()) // body)]
        if all(len(rows[s]) >= n[s] for s in rows):
            return {s: rows[s][: n[s]] for s in rows}, min(start + window, len(docs))
    raise AssertionError("the reference corpus is too small")


def check_contexts(out, docs: list[Document], n: dict[str, int], context_size: int) -> None:
    """Exactly n[split] contexts per split, BOS first, each the tokens of one chunk of one document."""
    body = context_size - 1
    texts = {d.doc_id: d.text for d in docs}
    for split, (tokens, table) in out.items():
        assert tokens.shape == (n[split], context_size) and tokens.dtype == np.int32
        assert (tokens[:, 0] == BOS).all()
        assert table["context"].to_list() == list(range(n[split]))
        for (ctx, doc_id, chunk), row in zip(table.iter_rows(), tokens, strict=True):
            ids = TOK([texts[doc_id]])["input_ids"][0]
            assert row[1:].tolist() == ids[chunk * body : (chunk + 1) * body], (split, ctx)


def test_one_window_over_the_whole_stream_gives_the_in_memory_contexts():
    docs, n, cs = corpus(400), {"train": 120, "eval": 30}, 9
    splits, _ = split_block(docs, 0.2, 3)
    expected = {s: make_contexts(splits[s], TOK, n[s], cs, s) for s in ("train", "eval")}
    for window in (400, 401, 10_000):
        out, counts = stream_contexts(iter(docs), TOK, n, cs, 0.2, 3, window)
        for s in ("train", "eval"):
            assert np.array_equal(out[s][0], expected[s][0])
            assert out[s][1].equals(expected[s][1])
        assert counts["train"]["documents"] == len(splits["train"])
        assert counts["eval"]["documents"] == len(splits["eval"])
        assert counts["stream"]["documents_read"] == 400


@pytest.mark.parametrize("window", [1, 7, 64])
def test_windowed_order_budget_and_stop_match_the_reference(window):
    docs, n, cs = corpus(3000, seed=1), {"train": 300, "eval": 60}, 9
    stream = Counting(docs)
    out, counts = stream_contexts(stream, TOK, n, cs, 0.25, 5, window)
    rows, read = reference(docs, n, cs, 0.25, 5, window)
    for s in ("train", "eval"):
        assert list(zip(out[s][1]["doc_id"], out[s][1]["chunk"], strict=True)) == rows[s]
    check_contexts(out, docs, n, cs)
    # reading stops with the window in which the last split filled up: most of the stream is never read
    assert stream.taken == read == counts["stream"]["documents_read"] < len(docs)


def test_splits_are_disjoint_follow_the_hash_and_are_deterministic_per_seed():
    docs, n, cs = corpus(2000, seed=2), {"train": 200, "eval": 60}, 9
    a, _ = stream_contexts(iter(docs), TOK, n, cs, 0.3, 11, 50)
    b, _ = stream_contexts(iter(docs), TOK, n, cs, 0.3, 11, 50)
    c, _ = stream_contexts(iter(docs), TOK, n, cs, 0.3, 12, 50)
    ids = {s: set(a[s][1]["doc_id"]) for s in a}
    assert not ids["train"] & ids["eval"]
    assert all(doc_hash(d, 11) < 0.3 for d in ids["eval"]) and all(doc_hash(d, 11) >= 0.3 for d in ids["train"])
    for s in a:
        assert np.array_equal(a[s][0], b[s][0]) and a[s][1].equals(b[s][1])
    assert set(c["eval"][1]["doc_id"]) != ids["eval"]


def test_a_short_or_empty_stream_fails_with_one_sentence():
    docs = corpus(50)
    with pytest.raises(CorpusError, match=r"the train split holds only \d+ full contexts .* but 10000 were requested"):
        stream_contexts(iter(docs), TOK, {"train": 10_000, "eval": 1}, 9, 0.2, 0, 16)
    with pytest.raises(CorpusError, match="contains no documents"):
        stream_contexts(iter([]), TOK, {"train": 1, "eval": 1}, 9, 0.2, 0, 16)


BLANK = Document("blank", " ")


def generated(n: int, tail: int = 200) -> Iterator[Document]:
    """n documents, made on the fly: every tenth a short one with its own id (hashed, split, tokenized, too short
    for a context), the others one blank document (read and skipped; shared, so that the generator itself
    allocates little under tracemalloc), and last ``tail`` long ones: the budget can only be met at the end of
    the stream, so every document is read."""
    for i in range(n - tail):
        yield Document(f"g{i}", "1 2 3") if i % 10 == 0 else BLANK
    long = " ".join(["5"] * 40)
    for i in range(n - tail, n):
        yield Document(f"g{i}", long)


def peak_bytes(n: int) -> tuple[int, dict]:
    tok = WordTokenizer()
    tracemalloc.start()
    try:
        _, counts = stream_contexts(generated(n), tok, {"train": 20, "eval": 5}, 9, 0.2, 0, 1000)
        return tracemalloc.get_traced_memory()[1], counts
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_from_1e5_to_1e6_documents():
    small, counts_small = peak_bytes(100_000)
    large, counts_large = peak_bytes(1_000_000)
    assert counts_small["stream"]["documents_read"] == 100_000  # the whole stream was read, both times
    assert counts_large["stream"]["documents_read"] == 1_000_000
    # ten times the documents, the same window of 1000 in memory: the peaks may differ by allocator noise only.
    # Keeping as little as a pointer (8 bytes) per document read would add 7 MB; per non-blank one, 0.7 MB.
    assert large <= 1.1 * small + 64 * 1024, (small, large)
    assert small < 1024 * 1024, small  # one window of documents and the outputs, not the stream


def test_the_datasets_library_streams_a_local_dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    docs = corpus(120, seed=4)
    with open(folder / "train.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "meta": 1}) + "\n")
    name = str(folder)
    expected = [Document(f"hf:{name}/{i}", d.text) for i, d in enumerate(docs)]
    read = list(hf_documents(name, "train", "text"))
    assert read == expected
    cfg = CorpusConfig(sources=(f"hf:{name}",), eval_fraction=0.25, seed=2, shuffle_window=32)
    n = {"train": 40, "eval": 10}
    out, counts = corpus_contexts(cfg, TOK, n, 9)
    ref, _ = stream_contexts(iter(expected), TOK, n, 9, 0.25, 2, 32)
    for s in n:
        assert np.array_equal(out[s][0], ref[s][0]) and out[s][1].equals(ref[s][1])
    assert counts["stream"]["window"] == 32
    with pytest.raises(CorpusError, match="row 0 has no string field 'body'"):
        next(hf_documents(name, "train", "body"))
    with pytest.raises(CorpusError, match="could not be opened"):
        next(hf_documents(name, "validation", "text"))


def test_a_missing_datasets_package_is_one_sentence(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(CorpusError, match=r"needs the package 'datasets' \(pip install datasets\)"):
        next(hf_documents("some/dataset", "train", "text"))


def test_local_sources_are_read_whole_whatever_the_window():
    """Without an hf: source the corpus is split and ordered globally, and each split counts all its documents."""
    cfg = CorpusConfig(sources=("pydoc",), eval_fraction=0.2, seed=0, shuffle_window=1)
    splits = split_documents(cfg)
    n = {"train": 30, "eval": 10}
    out, counts = corpus_contexts(cfg, CharTokenizer(), n, 5)
    assert counts == {s: {"documents": len(splits[s])} for s in ("train", "eval")}
    for s in n:
        tokens, table = make_contexts(splits[s], CharTokenizer(), n[s], 5, s)
        assert np.array_equal(out[s][0], tokens) and out[s][1].equals(table)


class CharTokenizer:
    bos_token_id = BOS

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[2 + ord(c) % 50 for c in t] for t in texts]}
