"""The paper presets as a user runs them: shrunken end to end on the default corpus with their tokenizers
(pg19: SentencePiece, wikitext103: words), evaluated and sampled from the run folder; full size refused
before any allocation with the footprint estimate."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from ct_jax import presets
from ct_jax.commands import evaluate, generate, train
from ct_jax.tokenizers import TOKENIZER_RECORD

CORPUS_BYTES = "300000"  # of the default corpus: a tokenizer learns in seconds
SHRUNKEN = ["--dim", "64", "--depth", "1", "--heads", "4", "--seq-len", "32", "--mem-len", "32", "--cmem-len", "16",
            "--batch-size", "4", "--steps", "3", "--max-bytes", CORPUS_BYTES, "--no-progress", "--sample-length", "12",
            "--compile-cache", "", "--fast-compile"]


def _last_validation(out: Path) -> dict[str, float]:
    with open(out / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["val_bpb"]]
    return {key: float(value) for key, value in rows[-1].items() if value}


def _run_preset(tmp_path: Path, capsys, *flags: str) -> tuple[Path, str]:
    out = tmp_path / "run"
    status = train.main([*flags, *SHRUNKEN, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert (out / TOKENIZER_RECORD).is_file() and (out / "model" / TOKENIZER_RECORD).is_file()
    return out, captured.out


def _evaluated_bpb(path: Path, capsys) -> float:
    assert evaluate.main(["--checkpoint", str(path), "--max-bytes", CORPUS_BYTES, "--batch-size", "4",
                          "--split", "validation", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    return float(re.search(r"validation: ([0-9.]+) bits/byte \(([0-9.]+) bits/token", printed).group(1))


def test_pg19_runs_shrunken_with_sentencepiece(tmp_path, capsys):
    out, printed = _run_preset(tmp_path, capsys, "--preset", "pg19", "--tokenizer", "spm-train:2000")
    assert "sample (12 tokens after the prompt)" in printed
    last = _last_validation(out)
    assert last["val_bpb"] < last["val_bits_per_token"], f"a subword covers more than a byte: {last}"
    assert last["val_ppl"] == pytest.approx(2 ** last["val_bits_per_token"], rel=1e-6)
    # evaluate reads the stored tokenizer: the same whole-split number as the run's last validation
    assert _evaluated_bpb(out / "model", capsys) == pytest.approx(last["val_bpb"], abs=2e-4)
    assert generate.main(["--checkpoint", str(out), "--prime", "def ", "--length", "8"]) == 0
    assert "8 tokens in" in capsys.readouterr().err


def test_wikitext103_runs_shrunken_with_words(tmp_path, capsys):
    out, _ = _run_preset(tmp_path, capsys, "--preset", "wikitext103", "--tokenizer", "words:4")
    last = _last_validation(out)
    assert last["val_word_ppl"] == pytest.approx(last["val_ppl"], rel=1e-6), "words: the tokens are the words"
    assert generate.main(["--checkpoint", str(out / "model"), "--prime", "import os\n", "--length", "8",
                          "--stop-at-eos"]) == 0
    capsys.readouterr()
    # a resume reads the stored vocabulary (the same model), and refuses another tokenizer kind
    resume = ["--preset", "wikitext103", *SHRUNKEN, "--out", str(out)]
    assert train.main([*resume, "--tokenizer", "bytes"]) == 2
    assert "was trained with 'words:4'" in capsys.readouterr().err
    assert train.main([*resume, "--steps", "4"]) == 0, capsys.readouterr().err
    assert "resumed from step 3" in capsys.readouterr().out


def test_a_hugging_face_dataset_trains_with_words(tmp_path, capsys):
    from ct_jax import hf_data  # sets the Hub's offline mode before `datasets` loads

    datasets = hf_data.datasets
    rng = np.random.default_rng(0)
    vocabulary = "the cat sat on a mat while dogs ran far away".split()

    def documents(n: int) -> list[str]:
        return [" ".join(rng.choice(vocabulary, 60)) + "\n" + " ".join(rng.choice(vocabulary, 40)) for _ in range(n)]

    path = tmp_path / "dataset"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": documents(30)}),
                         validation=datasets.Dataset.from_dict({"text": documents(8)})).save_to_disk(str(path))
    flags = [flag for flag in SHRUNKEN if flag not in ("--max-bytes", CORPUS_BYTES)]
    out = tmp_path / "run"
    assert train.main(["--data", f"hf:{path}", "--tokenizer", "words", *flags, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert f"data: hf:{path}" in capsys.readouterr().out
    last = _last_validation(out)
    assert last["val_word_ppl"] == pytest.approx(last["val_ppl"], rel=1e-6)
    assert last["val_bpb"] < last["val_bits_per_token"] / 3, "a word here covers over 3 bytes"


def test_too_few_tokens_for_the_data_are_refused_before_training(tmp_path, capsys):
    status = train.main(["--tokenizer", "words:2", "--num-tokens", "100", *SHRUNKEN, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and re.search(r"num_tokens=100 \(--num-tokens\) is too small for the data: the "
                                     r"train split holds token ids up to \d{3,}; the model reads ids in \[0, 100\) "
                                     r"\(words:2, vocabulary \d+\)", err), err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("preset", ["pg19", "wikitext103"])
def test_full_size_presets_are_refused_with_the_estimate(preset, tmp_path, capsys):
    status = train.main(["--preset", preset, "--max-bytes", CORPUS_BYTES, "--no-progress", "--compile-cache", "",
                         "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2, err
    for part in ("this configuration needs about", "parameters", "optimizer state", "activations per step",
                 "Shrink, largest part first", "batch_size"):
        assert part in err, f"{part!r} missing from {err!r}"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_preset_tokenizers_and_cutoffs_fitted_to_the_vocabulary():
    assert presets.default_tokenizer("pg19") == "spm-train:32000"
    assert presets.default_tokenizer("wikitext103") == "words"
    assert presets.default_tokenizer(None) == presets.default_tokenizer("enwik8") == "bytes"
    model = dict(num_tokens=267_735, adaptive_cutoffs=[20000, 40000, 200000], adaptive_div_val=4)
    assert presets.fit_cutoffs(model, 300_000) == (dict(model, num_tokens=300_000), None)
    fitted, note = presets.fit_cutoffs(model, 50_000)
    assert fitted["adaptive_cutoffs"] == [20000, 40000] and fitted["num_tokens"] == 50_000
    assert "[20000, 40000, 200000]" in note and "50,000" in note
    fitted, note = presets.fit_cutoffs(model, 5_000)
    assert fitted["adaptive_cutoffs"] is None and "full softmax" in note
    assert presets.fit_cutoffs(dict(num_tokens=1), 256) == (dict(num_tokens=256), None)
