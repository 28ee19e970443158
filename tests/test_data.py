"""Tests for ct_jax.data: corpora, caching, sampler determinism / resume / sharding, helpers."""

import gzip
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ct_jax import data

SMALL_OFFSETS = (900, 950, 1000)  # the enwik8 90% / 5% / 5% split, scaled to 1000 bytes


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def is_memmapped(array: np.ndarray) -> bool:
    return isinstance(array, np.memmap) or isinstance(getattr(array, "base", None), np.memmap)


def write_enwik8(tmp_path: Path, fmt: str, content: bytes) -> Path:
    if fmt == "raw":
        path = tmp_path / "enwik8"
        path.write_bytes(content)
    elif fmt == "gz":
        path = tmp_path / "enwik8.gz"
        path.write_bytes(gzip.compress(content))
    else:
        path = tmp_path / "enwik8.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("enwik8", content)
    return path


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(os.listdir(cache_dir)) if cache_dir.exists() else []


@pytest.fixture
def small_enwik8(monkeypatch):
    monkeypatch.setattr(data, "ENWIK8_SPLIT_OFFSETS", SMALL_OFFSETS)


# --- enwik8 --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "gz", "zip"])
def test_enwik8_standard_split(tmp_path, small_enwik8, fmt):
    content = random_bytes(1000)
    path = write_enwik8(tmp_path, fmt, content)
    cache = tmp_path / "cache"
    splits = data.load_corpus(str(path), cache_dir=cache)
    assert sorted(splits) == ["test", "train", "validation"]
    for name, (lo, hi) in {"train": (0, 900), "validation": (900, 950), "test": (950, 1000)}.items():
        assert splits[name].dtype == np.uint8, f"{name} dtype {splits[name].dtype}"
        assert splits[name].tobytes() == content[lo:hi], f"{name} differs from bytes [{lo}, {hi})"
        assert is_memmapped(splits[name]), f"{name} is {type(splits[name])}, not memory-mapped"
    # Raw files are mapped in place; compressed ones go through exactly one cache file.
    expected_cache = 0 if fmt == "raw" else 1
    assert len(cache_files(cache)) == expected_cache, f"cache holds {cache_files(cache)}"
    assert not any(name.endswith(".tmp") for name in cache_files(cache)), "temp file left behind"


def test_enwik8_cache_reused(tmp_path, small_enwik8):
    path = write_enwik8(tmp_path, "gz", random_bytes(1000))
    cache = tmp_path / "cache"
    first = data.load_enwik8(path, cache)
    (cached,) = cache_files(cache)
    mtime = (cache / cached).stat().st_mtime_ns
    second = data.load_enwik8(path, cache)
    assert (cache / cached).stat().st_mtime_ns == mtime, "cache file was rewritten on the second load"
    np.testing.assert_array_equal(first["train"], second["train"])


def test_enwik8_split_offsets_argument(tmp_path):
    path = write_enwik8(tmp_path, "raw", random_bytes(100))
    splits = data.load_enwik8(path, split_offsets=(80, 90, 100))
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [80, 10, 10]


def test_enwik8_too_small_names_expected_size(tmp_path):
    path = write_enwik8(tmp_path, "raw", random_bytes(1000))
    with pytest.raises(ValueError, match=r"has 1000 bytes.*at least 100000000 bytes.*text:"):
        data.load_corpus(str(path))


def test_enwik8_prefix_and_text_prefix(tmp_path, small_enwik8):
    content = random_bytes(1000)
    other_name = tmp_path / "wiki.bin"
    other_name.write_bytes(content)
    assert len(data.load_corpus(f"enwik8:{other_name}")["test"]) == 50
    # 'text:' forces the generic loader even for a file named enwik8 (e.g. a truncated one).
    splits = data.load_corpus(f"text:{write_enwik8(tmp_path, 'raw', content[:500])}")
    assert sorted(splits) == ["train", "validation"]
    assert splits["train"].tobytes() + splits["validation"].tobytes() == content[:500]


def test_enwik8_zip_without_member_is_rejected(tmp_path):
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", b"a")
        archive.writestr("b.txt", b"b")
    with pytest.raises(ValueError, match=r"member named 'enwik8'.*'a.txt', 'b.txt'"):
        data.load_enwik8(path, tmp_path / "cache")


def test_failed_decompression_leaves_no_cache(tmp_path, small_enwik8):
    path = tmp_path / "enwik8.gz"
    path.write_bytes(gzip.compress(random_bytes(1000))[:-100])  # truncated stream
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"{path} is not a readable gz file \(corrupt or truncated\?\): EOFError"):
        data.load_enwik8(path, cache)
    assert cache_files(cache) == [], f"partial cache left behind: {cache_files(cache)}"


# --- text files and folders -------------------------------------------------------------


def test_single_text_file_tail_is_validation(tmp_path):
    content = random_bytes(1000)
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    splits = data.load_corpus(str(path))
    assert len(splits["validation"]) == 50, f"validation has {len(splits['validation'])} bytes, expected 5%"
    assert splits["train"].tobytes() + splits["validation"].tobytes() == content
    assert is_memmapped(splits["train"]) and is_memmapped(splits["validation"])
    assert data.load_corpus(str(path), max_bytes=200)["train"].tobytes() == content[:190]


def test_gzipped_text_file(tmp_path):
    content = b"hello world\n" * 100
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(content))
    splits = data.load_text_file(path, tmp_path / "cache", validation_fraction=0.1)
    assert splits["train"].tobytes() + splits["validation"].tobytes() == content
    assert len(splits["validation"]) == 120


def make_folder(root: Path, n_files: int) -> dict[str, bytes]:
    contents = {}
    for i in range(n_files):
        relative = f"sub{i % 3}/file{i:02d}.txt" if i % 2 else f"file{i:02d}.txt"
        contents[relative] = f"<{relative}>".encode() * (i + 1)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(contents[relative])
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_bytes(b"hidden")
    (root / ".hidden.txt").write_bytes(b"hidden")
    return contents


def test_folder_split_by_file(tmp_path):
    root = tmp_path / "corpus"
    contents = make_folder(root, 12)
    cache = tmp_path / "cache"
    splits = data.load_corpus(str(root), cache_dir=cache)
    ordered = [contents[name] for name in sorted(contents)]
    expected_validation = ordered[9]  # validation_every=10: the 10th file
    expected_train = b"".join(ordered[:9] + ordered[10:])
    assert splits["validation"].tobytes() == expected_validation
    assert splits["train"].tobytes() == expected_train, "train is not the sorted concatenation of the other files"
    assert is_memmapped(splits["train"]) and is_memmapped(splits["validation"])
    names = cache_files(cache)
    assert len(names) == 2 and all(name.endswith(".bin") for name in names), f"cache holds {names}"


def test_folder_validation_every(tmp_path):
    root = tmp_path / "corpus"
    contents = make_folder(root, 6)
    ordered = [contents[name] for name in sorted(contents)]
    splits, starts = data.load_folder(root, tmp_path / "cache", validation_every=3)
    assert splits["validation"].tobytes() == ordered[2] + ordered[5]
    assert splits["train"].tobytes() == b"".join(ordered[i] for i in (0, 1, 3, 4))
    sizes = [len(ordered[i]) for i in (0, 1, 3, 4)]
    np.testing.assert_array_equal(starts["train"], np.cumsum([0, *sizes[:-1]]), err_msg="a document per file")
    np.testing.assert_array_equal(starts["validation"], [0, len(ordered[2])], err_msg="a document per file")


def test_folder_cache_invalidated_by_change(tmp_path):
    root = tmp_path / "corpus"
    make_folder(root, 4)
    cache = tmp_path / "cache"
    before = data.load_folder(root, cache, validation_every=2).splits["train"].tobytes()
    (root / "file00.txt").write_bytes(b"changed!")
    after = data.load_folder(root, cache, validation_every=2).splits["train"].tobytes()
    assert after.startswith(b"changed!") and after != before


def test_a_folder_of_fewer_files_than_validation_every_keeps_its_last_file_for_validation(tmp_path):
    root = tmp_path / "corpus"
    contents = make_folder(root, 3)
    ordered = [contents[name] for name in sorted(contents)]
    messages = []
    corpus = data.read_corpus(str(root), tmp_path / "cache", log=messages.append)
    assert corpus.splits["validation"].tobytes() == ordered[2]
    assert corpus.splits["train"].tobytes() == ordered[0] + ordered[1]
    assert messages == [f"folder corpus at {root} has 3 files, fewer than validation_every=10 (--validation-every): "
                        f"its last file, {sorted(contents)[2]}, is validation"], messages
    every_second = data.read_corpus(str(root), tmp_path / "cache", validation_every=2).splits
    assert every_second["validation"].tobytes() == ordered[1], "validation_every=2: the second file"
    with pytest.raises(ValueError, match="validation_every must be an int >= 2, got 1"):
        data.read_corpus(str(root), tmp_path / "cache", validation_every=1)


def test_a_folder_of_one_file_splits_its_bytes(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "only.txt").write_bytes(bytes(range(200)))
    messages = []
    corpus = data.read_corpus(str(root), tmp_path / "cache", log=messages.append)
    assert corpus.splits["train"].tobytes() == bytes(range(190))
    assert corpus.splits["validation"].tobytes() == bytes(range(190, 200))
    assert messages == [f"folder corpus at {root} has one file: its last 5% of bytes is validation"], messages


# --- default corpus -----------------------------------------------------------------------


def test_stdlib_corpus_is_nontrivial_and_deterministic(tmp_path):
    first = data.load_corpus(None, cache_dir=tmp_path / "a", max_bytes=300_000)
    second = data.load_corpus(None, cache_dir=tmp_path / "b", max_bytes=300_000)
    total = len(first["train"]) + len(first["validation"])
    assert 100_000 < total <= 300_000, f"stdlib corpus has {total} bytes"
    assert len(first["validation"]) > 1000, f"validation has {len(first['validation'])} bytes"
    assert b"def " in first["train"].tobytes() and b"import " in first["train"].tobytes()
    for split in ("train", "validation"):
        np.testing.assert_array_equal(first[split], second[split], err_msg=f"{split} differs between loads")
        assert is_memmapped(first[split])


def test_stdlib_files_exclusions():
    files = data.stdlib_source_files()
    assert len(files) > 100
    assert all(file.suffix == ".py" for file in files)
    excluded = [file for file in files if data.STDLIB_EXCLUDED_DIRS & set(file.parts)]
    assert excluded == [], f"excluded directories present: {excluded[:3]}"
    assert files == sorted(files, key=lambda file: file.as_posix()), "files not in sorted order"


# --- validation of inputs -------------------------------------------------------------------


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_corpus(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_corpus(f"enwik8:{missing}")


@pytest.mark.parametrize("spec", ["", "  ", "text:", "enwik8:", "text: "])
def test_an_empty_data_spec_is_refused_never_the_current_folder(spec):
    with pytest.raises(ValueError, match="names no path"):
        data.load_corpus(spec)


def test_corrupt_archives_name_the_file(tmp_path):
    gz, bad_zip = tmp_path / "corpus.txt.gz", tmp_path / "corpus.zip"
    gz.write_bytes(b"\x1f\x8b not gzip at all")
    bad_zip.write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match=f"{gz} is not a readable gz file"):
        data.load_corpus(str(gz), tmp_path / "cache")
    with pytest.raises(ValueError, match=f"{bad_zip} is not a readable zip file"):
        data.load_corpus(str(bad_zip), tmp_path / "cache")
    with pytest.raises(ValueError, match="is a folder"):
        data.load_corpus(f"enwik8:{tmp_path}")


def test_fingerprint_tells_corpora_apart():
    a = {"train": np.arange(10_000, dtype=np.uint8), "validation": np.zeros(100, np.uint8)}
    b = {"train": a["train"].copy(), "validation": a["validation"].copy()}
    assert data.fingerprint(a) == data.fingerprint(b)
    b["train"][5000] += 1
    assert data.fingerprint(a) != data.fingerprint(b)
    assert data.fingerprint(a) != data.fingerprint({"train": a["train"][:-1], "validation": a["validation"]})


def test_split_shorter_than_window(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(random_bytes(1000))
    with pytest.raises(ValueError, match=r"split 'validation' has 50 bytes, fewer than one window of 65 bytes"):
        data.load_corpus(str(path), window=65)
    train = data.load_corpus(str(path))["train"]
    with pytest.raises(ValueError, match=r"split 'train' has 950 bytes, fewer than one window of 951"):
        data.WindowSampler(train, window=951, batch_size=2, seed=0)


def test_max_bytes_rejected_for_enwik8(tmp_path, small_enwik8):
    path = write_enwik8(tmp_path, "raw", random_bytes(1000))
    with pytest.raises(ValueError, match="max_bytes=10 does not apply to enwik8"):
        data.load_corpus(str(path), max_bytes=10)


# --- sampler ------------------------------------------------------------------------------


@pytest.fixture
def corpus_bytes():
    return np.frombuffer(random_bytes(5000, seed=1), dtype=np.uint8)


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_shape_dtype_and_windows_in_data(corpus_bytes):
    window = 33
    batches = take(data.WindowSampler(corpus_bytes, window, batch_size=8, seed=0), 5)
    all_windows = np.lib.stride_tricks.sliding_window_view(corpus_bytes, window).astype(np.int32)
    for batch in batches:
        assert batch.shape == (8, window) and batch.dtype == np.int32, f"{batch.shape} {batch.dtype}"
        for row in batch:
            assert (all_windows == row).all(axis=1).any(), "a row is not a contiguous window of the data"


def test_sampler_deterministic_and_seed_dependent(corpus_bytes):
    first = take(data.WindowSampler(corpus_bytes, 17, 4, seed=3), 4)
    again = take(data.WindowSampler(corpus_bytes, 17, 4, seed=3), 4)
    other = take(data.WindowSampler(corpus_bytes, 17, 4, seed=4), 4)
    for step, (a, b) in enumerate(zip(first, again)):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {step} differs for the same seed")
    assert any((a != c).any() for a, c in zip(first, other)), "different seeds gave identical batches"
    assert any((first[0] != batch).any() for batch in first[1:]), "batches repeat across steps"


@pytest.mark.parametrize("k", [0, 1, 5])
def test_sampler_resume(corpus_bytes, k):
    uninterrupted = data.WindowSampler(corpus_bytes, 17, 4, seed=7)
    reference = take(uninterrupted, k + 3)
    interrupted = data.WindowSampler(corpus_bytes, 17, 4, seed=7)
    take(interrupted, k)
    state = interrupted.state_dict()
    assert state == {"seed": 7, "step": k}
    restored = data.WindowSampler(corpus_bytes, 17, 4, seed=0)
    restored.load_state_dict(state)
    for step, batch in enumerate(take(restored, 3), start=k):
        np.testing.assert_array_equal(batch, reference[step], err_msg=f"resumed batch {step} differs")


def test_sampler_load_state_dict_rejects_bad_state(corpus_bytes):
    sampler = data.WindowSampler(corpus_bytes, 17, 4, seed=7)
    with pytest.raises(ValueError, match=r"keys \{'seed', 'step'\}, got \['step'\]"):
        sampler.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match=r"state\['step'\] must be an int >= 0, got -1"):
        sampler.load_state_dict({"seed": 0, "step": -1})


@pytest.mark.parametrize("process_count", [2, 4])
def test_sampler_shards_concatenate_to_global_batch(corpus_bytes, process_count):
    global_batches = take(data.WindowSampler(corpus_bytes, 17, 8, seed=5), 3)
    shards = [
        take(data.WindowSampler(corpus_bytes, 17, 8, seed=5, process_index=p, process_count=process_count), 3)
        for p in range(process_count)
    ]
    for step, global_batch in enumerate(global_batches):
        local = [shard[step] for shard in shards]
        assert all(batch.shape == (8 // process_count, 17) for batch in local)
        np.testing.assert_array_equal(np.concatenate(local), global_batch,
                                      err_msg=f"step {step}: shards != global batch")


def test_sampler_argument_errors(corpus_bytes):
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be divisible by process_count \(4\)"):
        data.WindowSampler(corpus_bytes, 17, 6, seed=0, process_count=4)
    with pytest.raises(ValueError, match=r"process_index must be an int in \[0, 2\), got 2"):
        data.WindowSampler(corpus_bytes, 17, 4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="window must be an int >= 2, got 1"):
        data.WindowSampler(corpus_bytes, 1, 4, seed=0)
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        data.WindowSampler(corpus_bytes, 17, 4, seed=-1)


def test_sampler_on_memmap(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(random_bytes(2000))
    train = data.load_corpus(str(path))["train"]
    batch = next(data.WindowSampler(train, 65, 4, seed=0))
    assert type(batch) is np.ndarray and batch.dtype == np.int32, f"{type(batch)} {batch.dtype}"


# --- evaluation batches --------------------------------------------------------------------


def test_eval_batches_cover_every_target_once():
    stream = np.arange(100, dtype=np.uint8)
    batches = list(data.eval_batches(stream, window=11, batch_size=4))
    assert [batch.shape for batch in batches] == [(4, 11), (4, 11), (1, 11)]  # 99 // 10 = 9 windows
    windows = np.concatenate(batches)
    np.testing.assert_array_equal(windows[:, 0], np.arange(9) * 10)
    targets = windows[:, 1:].reshape(-1)
    np.testing.assert_array_equal(targets, np.arange(1, 91), err_msg="targets are not each byte once, in order")


def test_eval_batches_limits():
    stream = np.arange(100, dtype=np.uint8)
    assert len(list(data.eval_batches(stream, 11, 4, max_batches=2))) == 2
    assert len(list(data.eval_batches(stream, 11, 4, drop_remainder=True))) == 2
    first = list(data.eval_batches(stream, 11, 4))
    second = list(data.eval_batches(stream, 11, 4))
    assert all((a == b).all() for a, b in zip(first, second))
    with pytest.raises(ValueError, match=r"split 'validation' has 100 bytes, fewer than one window of 101"):
        data.eval_batches(stream, 101, 4)  # raised at call time, not on first next()


# --- text helpers ---------------------------------------------------------------------------


def test_encode_decode_round_trip():
    text = "Compressive memory — ünïcode ✓"
    tokens = data.encode_text(text)
    assert tokens.dtype == np.int32 and len(tokens) == len(text.encode("utf-8"))
    assert data.decode_bytes(tokens) == text
    assert data.decode_bytes(tokens[:-1]).endswith("\ufffd"), "a cut multi-byte char should decode to U+FFFD"


def test_decode_rejects_non_bytes():
    with pytest.raises(ValueError, match=r"bytes in \[0, 255\], got range \[0, 256\]"):
        data.decode_bytes(np.array([0, 256]))
    with pytest.raises(ValueError, match=r"must be 1-D, got shape \(1, 2\)"):
        data.decode_bytes(np.array([[65, 66]]))


def test_folder_max_bytes_keeps_whole_files_in_order(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, size in [("a", 10), ("b", 50), ("c", 10), ("d", 10), ("e", 10)]:
        (root / name).write_bytes(name.encode() * size)
    splits = data.load_folder(root, tmp_path / "cache", validation_every=2, max_bytes=35).splits
    # b (50 bytes) would overflow the budget and is skipped; a, c, d fit (30 bytes), e does not.
    assert splits["train"].tobytes() + splits["validation"].tobytes() == b"a" * 10 + b"d" * 10 + b"c" * 10


def test_a_cache_write_killed_midway_leaves_no_orphan_after_the_next_load(tmp_path):
    """A real SIGKILL while the decompressed cache is written, then the same load again."""
    content = random_bytes(5000)
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(content))
    cache = tmp_path / "cache"
    code = ("import sys, time, shutil\nfrom ct_jax import data\n"
            "def stuck(source, out, size):\n    out.write(source.read(10)); out.flush(); print('writing', flush=True)"
            "; time.sleep(60)\n"
            "data.shutil = type('S', (), {'copyfileobj': staticmethod(stuck)})\n"
            "data.load_corpus(sys.argv[1], sys.argv[2])")
    root = Path(__file__).resolve().parent.parent
    writer = subprocess.Popen([sys.executable, "-c", code, str(path), str(cache)], cwd=root, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(root)))
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert len(list(cache.glob(".*.tmp"))) == 1, "the kill should leave the temporary"
    splits = data.load_corpus(str(path), cache)
    assert splits["train"].tobytes() + splits["validation"].tobytes() == content
    assert not list(cache.glob(".*.tmp")), f"orphan left: {list(cache.iterdir())}"


def test_check_spec_takes_the_hf_form_without_reading_it():
    data.check_spec("hf:some/dataset:config")  # checked when read (ct_jax.hf_data), not here
    with pytest.raises(ValueError, match="names no dataset"):
        data.check_spec("hf: ")
