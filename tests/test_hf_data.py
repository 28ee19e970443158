"""`--data hf:...`: a dataset saved with save_to_disk, made on the fly (offline, nothing downloaded)."""

from __future__ import annotations

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: never reach the Hub

import datasets  # noqa: E402
import pytest  # noqa: E402

from ct_jax.hf_data import load_hf_documents, parse_hf_spec  # noqa: E402

TRAIN = ["first document\nwith two lines", "second", "third é"]
VALIDATION = ["held out"]
TEST = ["test one", "test two"]

datasets.disable_progress_bars()


def _save(path, **splits) -> str:
    datasets.DatasetDict({name: datasets.Dataset.from_dict(columns) for name, columns in splits.items()}).save_to_disk(
        str(path))
    return f"hf:{path}"


def test_saved_dataset_gives_documents_per_split(tmp_path):
    spec = _save(tmp_path / "corpus", train={"text": TRAIN, "id": [1, 2, 3]},
                 validation={"text": VALIDATION, "id": [4]}, test={"text": TEST, "id": [5, 6]})
    splits = load_hf_documents(spec)
    assert list(splits) == ["train", "validation", "test"]
    assert list(splits["train"]) == TRAIN and splits["train"][2] == TRAIN[2] and len(splits["train"]) == 3
    assert list(splits["validation"]) == VALIDATION and list(splits["test"]) == TEST


def test_test_split_is_optional(tmp_path):
    splits = load_hf_documents(_save(tmp_path / "c", train={"text": TRAIN}, validation={"text": VALIDATION}))
    assert list(splits) == ["train", "validation"]


def test_other_column(tmp_path):
    spec = _save(tmp_path / "c", train={"body": TRAIN}, validation={"body": VALIDATION})
    assert list(load_hf_documents(spec, column="body")["validation"]) == VALIDATION
    with pytest.raises(ValueError, match=r"split 'train' has columns \['body'\], no 'text' column"):
        load_hf_documents(spec)


def test_missing_split_is_named(tmp_path):
    spec = _save(tmp_path / "c", train={"text": TRAIN}, test={"text": TEST})
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], missing \['validation'\]"):
        load_hf_documents(spec)


def test_dataset_without_splits_is_refused(tmp_path):
    datasets.Dataset.from_dict({"text": TRAIN}).save_to_disk(str(tmp_path / "flat"))
    with pytest.raises(ValueError, match="one dataset without splits"):
        load_hf_documents(f"hf:{tmp_path / 'flat'}")


def test_missing_path_or_name_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"no dataset 'no_such_dataset_xyz' \(config 'cfg'\) in the local"):
        load_hf_documents("hf:no_such_dataset_xyz:cfg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a dataset saved with save_to_disk"):
        load_hf_documents(f"hf:{tmp_path / 'empty'}")


def test_spec_parsing(tmp_path):
    assert parse_hf_spec("hf:pg19") == ("pg19", None)
    assert parse_hf_spec("hf:wikitext:wikitext-103-raw-v1") == ("wikitext", "wikitext-103-raw-v1")
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_hf_spec(f"hf:{odd}") == (str(odd), None), "an existing path is taken whole, colon included"
    for bad in ("pg19", "hf:", "hf:  "):
        with pytest.raises(ValueError, match=r"--data must be hf:PATH_OR_NAME\[:CONFIG\]"):
            parse_hf_spec(bad)


def test_read_corpus_reads_a_dataset_as_documents(tmp_path):
    from ct_jax.data import read_corpus

    spec = _save(tmp_path / "corpus", train={"text": TRAIN}, validation={"text": VALIDATION})
    for _ in range(2):  # written once, then read from the cache
        corpus = read_corpus(spec, tmp_path / "cache")
        assert bytes(corpus.splits["train"]) == "".join(TRAIN).encode()
        assert corpus.starts["train"].tolist() == [0, len(TRAIN[0].encode()), len((TRAIN[0] + TRAIN[1]).encode())]
        assert bytes(corpus.splits["validation"]) == VALIDATION[0].encode()
    capped = read_corpus(spec, tmp_path / "cache", max_bytes=len(TRAIN[0]) + 3)
    assert bytes(capped.splits["train"]) == TRAIN[0].encode(), "whole rows only, up to max_bytes"
