"""Bad inputs through the real entry points: each ends with one sentence naming the file, key or value and what was
expected (``error: …`` and exit code 2 from the workflow's CLI, no traceback), and nothing half-written under a
final name. docs/reliability.md lists every case with what the user sees.

The CLI runs in-process (``darkmatter.cli.main``, what ``python -m darkmatter.cli`` calls) so that a case costs no
interpreter start; ``tests/test_workflow.py`` checks the same path in a real subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import analyses.error_predictability as error_predictability
from darkmatter.analysis.contract import run_cli
from darkmatter.cli import main
from darkmatter.config import ConfigError, CorpusConfig, SaeTrainingConfig, load_config, to_dict
from darkmatter.io import atomic_file, write_json
from darkmatter.sae import save_sae
from darkmatter.store.build import StoreError, build_experiment_database
from tests.helpers import (
    HOOK,
    REPO,
    _ByteTokenizer,
    make_experiment,
    make_report_experiment,
    random_sae,
    write_activation_store,
)

D = 12


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI and return its one error line (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_nothing_written(final: Path) -> None:
    """No output under ``final``'s name and no temporary sibling left behind (darkmatter.io's naming)."""
    assert not final.exists()
    assert not list(final.parent.glob(f".{final.name}.tmp-*"))


def store_with(folder: Path, x: np.ndarray) -> Path:
    return write_activation_store(folder, x, np.repeat(np.arange(len(x) // 50), 50), 8)


@pytest.fixture
def acts(tmp_path) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((200, D)).astype(np.float32)


def encode(tmp_path: Path, sae: Path, activations: Path) -> list[str]:
    return ["encode-sae", "--params", "{}", "--sae", str(sae), "--activations", str(activations), "--hook", HOOK,
            "--out", str(tmp_path / "codes")]


# --------------------------------------------------------------------------------------------- activations, SAEs


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_activations(tmp_path, acts, capsys, value):
    acts[137, 5] = value
    store = store_with(tmp_path / "acts", acts)
    save_sae(random_sae(d_in=D), tmp_path / "sae")
    line = cli_error(encode(tmp_path, tmp_path / "sae", store), capsys)
    assert f"{store / HOOK}.npy: row 137 holds NaN or infinite values" in line
    assert_nothing_written(tmp_path / "codes")


def test_non_finite_training_activations(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((2000, D)).astype(np.float32)
    x[1500, 3] = np.nan
    store = store_with(tmp_path / "train", x)
    write_json(tmp_path / "model.json", {"name": "m"})
    training = to_dict(SaeTrainingConfig(tokens=1024, batch_size=256, buffer_tokens=2048, precision="float32"))
    out = tmp_path / "saes" / "topk-w24-k4-s0"
    line = cli_error(["train-sae", "--params", json.dumps({"training": training}), "--activations", str(store),
                      "--model", str(tmp_path / "model.json"), "--hook", HOOK, "--sae-id", out.name, "--out",
                      str(out)], capsys)
    assert f"{store / HOOK}.npy: row 1500 holds NaN or infinite values" in line
    assert_nothing_written(out)


def test_non_finite_sae_weights(tmp_path, acts, capsys):
    sae = random_sae(d_in=D)
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")
    save_sae(sae, tmp_path / "sae")
    line = cli_error(encode(tmp_path, tmp_path / "sae", store_with(tmp_path / "acts", acts)), capsys)
    assert f"{tmp_path / 'sae'}: tensors ['W_dec'] hold NaN or infinite values; expected finite weights." in line
    assert_nothing_written(tmp_path / "codes")


def test_sae_d_in_differs_from_the_hook(tmp_path, acts, capsys):
    save_sae(random_sae(d_in=D + 4), tmp_path / "sae")
    store = store_with(tmp_path / "acts", acts)
    line = cli_error(encode(tmp_path, tmp_path / "sae", store), capsys)
    assert f"has d_in={D + 4} but the activations of {HOOK} in {store} have d_model={D}" in line
    assert_nothing_written(tmp_path / "codes")


def _truncate(path: Path) -> None:
    """Keep the first quarter (a DuckDB file's free blocks at its end may be lost harmlessly: a quarter never is)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 4])


def _scramble(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(bytes(b ^ 0x5A for b in data[:64]) + data[64:])


@pytest.mark.parametrize("damage", [_truncate, _scramble])
def test_damaged_sae_weights(tmp_path, acts, capsys, damage):
    save_sae(random_sae(d_in=D), tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    damage(weights)
    line = cli_error(encode(tmp_path, tmp_path / "sae", store_with(tmp_path / "acts", acts)), capsys)
    assert f"{weights}: not a readable .safetensors file" in line
    assert_nothing_written(tmp_path / "codes")


@pytest.mark.parametrize("damage", [_truncate, _scramble])
def test_damaged_activation_array(tmp_path, acts, capsys, damage):
    store = store_with(tmp_path / "acts", acts)
    damage(store / f"{HOOK}.npy")
    save_sae(random_sae(d_in=D), tmp_path / "sae")
    line = cli_error(encode(tmp_path, tmp_path / "sae", store), capsys)
    assert f"{store / HOOK}.npy: not a" in line and ".npy array" in line and "pickle" not in line
    assert_nothing_written(tmp_path / "codes")


# --------------------------------------------------------------------------------------------- Parquet and DuckDB


@pytest.mark.parametrize("damage", [_truncate, _scramble])
def test_damaged_token_error_shard(tmp_path, damage):
    exp = make_experiment(tmp_path, n_contexts=4, n_positions=40, widths=(16, 32), ks=(4,))
    before = exp.db.read_bytes()
    shard = exp.paths.sae_errors(HOOK, exp.sae_ids[0]) / "token_errors.parquet"
    damage(shard)
    families = [from_family(f) for f in exp.params["families"]]
    with pytest.raises(StoreError) as e:
        build_experiment_database(exp.paths, families, HOOK, tokenizer=_ByteTokenizer())
    assert str(e.value).startswith(f"{shard}: not a readable Parquet file") and "\n" not in str(e.value)
    assert exp.db.read_bytes() == before  # the previous store stays, untouched
    assert not list(exp.db.parent.glob(f".{exp.db.name}.tmp-*"))


def from_family(data: dict):
    from darkmatter.config import from_dict
    from darkmatter.config.sections import SaeFamilyConfig

    return from_dict(SaeFamilyConfig, data)


@pytest.fixture(scope="module")
def report_experiment(tmp_path_factory):
    return make_report_experiment(tmp_path_factory.mktemp("report"), n_contexts=2, n_positions=20, analyses=False)


@pytest.mark.parametrize("damage", [_truncate, _scramble])
def test_damaged_store_in_analysis_and_report(tmp_path, report_experiment, capsys, damage):
    db = tmp_path / "results" / "x" / "darkmatter.duckdb"
    db.parent.mkdir(parents=True)
    db.write_bytes(report_experiment.db.read_bytes())
    damage(db)
    out = tmp_path / "analysis"
    with pytest.raises(SystemExit) as exit_:  # python -m analyses.<name>, as the workflow runs it
        run_cli(error_predictability, ["--db", str(db), "--params", "{}", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        next(line for line in err.splitlines() if line.startswith(f"error: {db}: not a readable DuckDB store"))]
    assert_nothing_written(out)
    index = tmp_path / "reports" / "x" / "index.html"
    line = cli_error(["render-report", "--params", "{}", "--db", str(db), "--out", str(index)], capsys)
    assert line.startswith(f"error: {db}: not a readable DuckDB store")
    assert_nothing_written(index)
    assert_nothing_written(index.parent / "browser.html")


# --------------------------------------------------------------------------------------------- corpus


@pytest.fixture
def prepare_corpus(tmp_path, llama_dir, capsys):
    """Run prepare-corpus on ``sources``; returns (error line or None, the corpus folder)."""
    write_json(tmp_path / "model.json", {"path": str(llama_dir)})
    out = tmp_path / "corpus"

    def go(sources: list[Path], eval_contexts: int = 2, context_size: int = 64) -> tuple[str | None, Path]:
        params = {"corpus": to_dict(CorpusConfig(sources=tuple(map(str, sources)), eval_fraction=0.5, seed=0)),
                  "harvest": {"context_size": context_size, "eval_contexts": eval_contexts, "train_tokens": 200,
                              "train_min_pos": 1}}
        argv = ["prepare-corpus", "--params", json.dumps(params), "--model", str(tmp_path / "model.json"),
                "--out", str(out)]
        try:
            main(argv)
        except SystemExit as exit_:
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert exit_.code == 2 and len(lines) == 1 and "Traceback" not in err, err
            return lines[0], out
        return None, out

    return go


def test_corpus_with_invalid_utf8(tmp_path, prepare_corpus):
    txt, jsonl = tmp_path / "bad.txt", tmp_path / "bad.jsonl"
    txt.write_bytes(b"fine text " * 50 + b"\xff\xfe broken " + b"more " * 50)
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    line, out = prepare_corpus([txt])
    assert line == f"error: {txt}: byte 500 is not valid UTF-8; expected a UTF-8 text file."
    assert_nothing_written(out)
    line, out = prepare_corpus([jsonl])
    assert line == f"error: {jsonl}: line 2 is not valid UTF-8 (byte 13 of the line); expected a UTF-8 text file."
    assert_nothing_written(out)


def test_corpus_jsonl_with_a_non_string_text(tmp_path, prepare_corpus):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": 5}\n')
    line, out = prepare_corpus([jsonl])
    assert line == f"error: {jsonl}: line 2 is not a JSON object with a string field 'text'."
    assert_nothing_written(out)


def test_missing_input_file_is_named(tmp_path, capsys):
    missing = tmp_path / "model" / "model.json"  # the OS's own FileNotFoundError (errno 2)
    params = {"corpus": {}, "harvest": {"context_size": 64, "eval_contexts": 2, "train_tokens": 200,
                                        "train_min_pos": 1}}
    line = cli_error(["prepare-corpus", "--params", json.dumps(params), "--model", str(missing), "--out",
                      str(tmp_path / "c")], capsys)
    assert line == f"error: [Errno 2] No such file or directory: '{missing}'"
    assert_nothing_written(tmp_path / "c")


def test_corpus_with_only_empty_documents(tmp_path, prepare_corpus):
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ("", "   ", "\n\n")) + "\n")
    line, out = prepare_corpus([jsonl])
    assert line == f"error: the corpus ['{jsonl}'] contains only empty documents (3); expected text."
    assert_nothing_written(out)


def test_corpus_empty_documents_are_skipped(tmp_path, prepare_corpus):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):  # a few hundred bytes each: one or two contexts of 64 byte tokens per document
        (folder / f"{i:02d}.txt").write_text(f"document {i} " * 30 if i % 2 else "")
    line, out = prepare_corpus([folder], eval_contexts=4)
    assert line is None
    import polars as pl

    docs = set(pl.concat([pl.read_parquet(out / f"{s}_contexts.parquet") for s in ("train", "eval")])["doc_id"])
    assert docs and all(int(d.split(".")[0]) % 2 == 1 for d in docs)  # only the non-empty documents


def test_corpus_of_one_enormous_document(tmp_path, prepare_corpus):
    big = tmp_path / "big.txt"
    big.write_text("All work and no play makes a dull model. " * 10_000)  # 420 kB, one document
    line, out = prepare_corpus([big])
    # a document goes to one split whole: the other split is empty, and the message says so and what to do
    assert line is not None and "split holds only 0 full contexts of 64 tokens from 0 documents" in line
    assert "add corpus sources or lower the requested size" in line
    assert_nothing_written(out)


def test_corrupted_parquet_corpus(tmp_path, prepare_corpus):
    import polars as pl

    path = tmp_path / "docs.parquet"
    pl.DataFrame({"text": ["some text"] * 100}).write_parquet(path)
    _truncate(path)
    line, out = prepare_corpus([path])
    assert line is not None and line.startswith(f"error: {path}: not a readable .parquet file")
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("edit", "key"), [
    ({"name": ".."}, "name"),
    ({"name": "../elsewhere"}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": ".hidden"}, "name"),
    ({"families": [{"name": "../x", "architecture": "topk", "widths": [64], "ks": [8]}]}, "families[0].name"),
    ({"families": [{"name": "a/b", "architecture": "topk", "widths": [64], "ks": [8]}]}, "families[0].name"),
    ({"harvest": {"hooks": ["blocks.1.hook_resid_post/../../x"]}}, "harvest.hooks[0]"),
    ({"analysis": {"names": ["../evil"]}}, "analysis.names[0]"),
    ({"harvest": {"context_size": 1}}, "harvest.context_size"),
    ({"corpus": {"eval_fraction": 1.5}}, "corpus.eval_fraction"),
    ({"families": [{"name": "w", "architecture": "topk", "widths": [8], "ks": [16]}]}, "families[0].ks"),
])
def test_impossible_config_values(edit, key):
    base = {"name": "x", "model": {"source": "random"}, "harvest": {"hooks": ["blocks.1.hook_resid_post"]}}
    data = base | {k: (base.get(k, {}) | v) if isinstance(v, dict) else v for k, v in edit.items()}
    with pytest.raises(ConfigError) as e:
        load_config(data=data)
    message = str(e.value)
    assert f"key '{key}'" in message and "\n" not in message, message


# --------------------------------------------------------------------------------------------- full disk


def test_disk_full_mid_write_leaves_no_output(tmp_path, acts, capsys, monkeypatch):
    store = store_with(tmp_path / "acts", acts)
    save_sae(random_sae(d_in=D), tmp_path / "sae")
    import darkmatter.sae.codes as codes

    saved = []
    real_save = np.save

    def fill_disk(path, array, *args, **kwargs):  # the first array fits, the second fills the disk halfway
        if saved:
            Path(path).write_bytes(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        saved.append(path)
        real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(codes.np, "save", fill_disk)
    line = cli_error(encode(tmp_path, tmp_path / "sae", store), capsys)
    assert line.startswith("error: no space left on the device while writing ") and "top_values.npy" in line
    assert_nothing_written(tmp_path / "codes")
    assert saved  # the failure really came halfway through the folder


def test_disk_full_keeps_the_previous_file(tmp_path):
    final = tmp_path / "metrics.json"
    write_json(final, {"old": 1})
    with pytest.raises(OSError) as e, atomic_file(final) as tmp:
        tmp.write_text('{"new": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.errno == errno.ENOSPC
    assert json.loads(final.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --------------------------------------------------------------------------------------------- concurrent runs


@pytest.mark.slow
def test_second_snakemake_run_on_one_experiment_is_refused(tmp_path):
    """Snakemake locks the working directory: a second run while the first is going stops before any job."""
    args = [sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "smoke.yaml")]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        locks = tmp_path / ".snakemake" / "locks"
        deadline = time.monotonic() + 120
        while not (locks.is_dir() and any(locks.iterdir())) and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # the first run was still going: the two really overlapped
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the first run's own process group: only what this test started
        first.wait(timeout=60)
    out = second.stdout + second.stderr
    assert second.returncode != 0
    assert "Directory cannot be locked" in out and "--unlock" in out, out
    assert "Traceback" not in out
