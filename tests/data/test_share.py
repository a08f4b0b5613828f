"""share_data_from: another experiment's data folders hard-linked after checking the settings they were made with."""

from __future__ import annotations

import json
import os

import pytest

from darkmatter.cli import main
from darkmatter.config import ExperimentConfig, step_slice
from darkmatter.data.share import share_folder
from darkmatter.io import InputError, read_json
from darkmatter.provenance import write_provenance

CORPUS = step_slice(ExperimentConfig(), "prepare-corpus")


def _finished(folder, params, files=("eval_tokens.npy",)):
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(os.urandom(64))
    write_provenance(folder, params)
    return folder


def test_equal_settings_share_every_file_by_hard_link(tmp_path):
    source = _finished(tmp_path / "a" / "corpus", CORPUS, ("eval_tokens.npy", "meta.json", ".snakemake_timestamp"))
    (source / "sub").mkdir()
    (source / "sub" / "x.bin").write_bytes(b"x")
    share_folder(source, tmp_path / "b" / "corpus", CORPUS, CORPUS)
    out = tmp_path / "b" / "corpus"
    for name in ("eval_tokens.npy", "meta.json", "sub/x.bin"):
        assert os.path.samefile(source / name, out / name)  # no copy: same file
    assert not (out / ".snakemake_timestamp").exists()  # Snakemake's own marker: never shared
    record = read_json(out / "provenance.json")
    assert record["shared_from"] == str(source) and record["source_provenance"]["params"] == CORPUS
    assert not os.path.samefile(source / "provenance.json", out / "provenance.json")


def test_a_model_json_names_the_new_folder(tmp_path):
    params = step_slice(ExperimentConfig(), "prepare-model")
    source = _finished(tmp_path / "results" / "a" / "model", params, ())
    (source / "hf").mkdir()
    (source / "hf" / "w.safetensors").write_bytes(b"w")
    (source / "model.json").write_text(json.dumps({"path": str(source / "hf"), "name": "m"}))
    out = tmp_path / "results" / "b" / "model"
    share_folder(source, out, params, params)
    assert read_json(out / "model.json") == {"path": str(out / "hf"), "name": "m"}
    assert read_json(source / "model.json")["path"] == str(source / "hf")  # the source's file is untouched


def test_different_settings_are_refused_naming_the_key(tmp_path):
    source = _finished(tmp_path / "a" / "corpus", CORPUS)
    other = json.loads(json.dumps(CORPUS))
    other["harvest"]["train_tokens"] = 600_000
    with pytest.raises(InputError, match=r"harvest\.train_tokens") as err:
        share_folder(source, tmp_path / "b" / "corpus", other, CORPUS)
    assert str(err.value).count(". ") == 0 and not (tmp_path / "b" / "corpus").exists()


def test_a_key_added_since_the_source_ran_must_hold_its_default(tmp_path):
    old = json.loads(json.dumps(CORPUS))
    del old["corpus"]["shuffle_window"]  # a run made before the key existed
    source = _finished(tmp_path / "a" / "corpus", old)
    share_folder(source, tmp_path / "b" / "corpus", CORPUS, CORPUS)  # ours holds the default: equal
    changed = json.loads(json.dumps(CORPUS))
    changed["corpus"]["shuffle_window"] = 7
    with pytest.raises(InputError, match=r"corpus\.shuffle_window"):
        share_folder(source, tmp_path / "c" / "corpus", changed, CORPUS)


def test_an_unfinished_source_is_one_sentence(tmp_path, capsys):
    (tmp_path / "a" / "corpus").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(["share-data", "--step", "prepare-corpus", "--params", json.dumps(CORPUS), "--source",
              str(tmp_path / "a" / "corpus"), "--out", str(tmp_path / "b" / "corpus")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no provenance.json" in err and err.count("\n") == 0

