"""Tests for ct_jax.streams: documents, streamed training batches (resets, padding, resume,
processes) and whole-split evaluation streams."""

import numpy as np
import pytest

from ct_jax import data, streams
from ct_jax.autoregressive import IGNORE_INDEX

SEQ_LEN = 4
SIZES = [10, 5, 1, 12, 3, 7]  # includes a 1-byte document (nothing to predict: skipped)


@pytest.fixture(scope="module")
def corpus():
    """(split, starts, document id of each byte): byte i holds i % 251 so neighbours are checkable."""
    starts = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    split = (np.arange(sum(SIZES)) % 251).astype(np.uint8)
    doc_of = np.repeat(np.arange(len(SIZES)), SIZES)
    return split, starts, doc_of


def segments(batch: streams.StreamBatch, seq_len: int = SEQ_LEN):
    """(row, s, inputs, targets, mask, reset) of every segment of a batch."""
    b, n = batch.resets.shape
    inputs, targets, mask = (x.reshape(b, n, seq_len) for x in batch[:3])
    for row in range(b):
        for s in range(n):
            yield row, s, inputs[row, s], targets[row, s], mask[row, s], batch.resets[row, s]


def check_segment(split, starts, doc_of, inputs, targets, mask, reset):
    """A segment is a left-aligned run of one document's bytes with their successors as targets."""
    real = int(mask.sum())
    assert real >= 1, "a segment without any target"
    assert mask[:real].all() and not mask[real:].any(), f"mask not left-aligned: {mask}"
    assert (targets[real:] == IGNORE_INDEX).all() and (inputs[real:] == 0).all(), "padding is not inert"
    first = int(np.flatnonzero(split == inputs[0])[0])  # byte values are unique in these corpora
    positions = first + np.arange(real + 1)
    np.testing.assert_array_equal(inputs[:real], split[positions[:-1]])
    np.testing.assert_array_equal(targets[:real], split[positions[1:]])
    assert len(set(doc_of[positions])) == 1, f"segment mixes documents {sorted(set(doc_of[positions]))}"
    if reset is False:
        assert first not in starts, f"document start {first} without a reset"
    return first, real


def test_ignore_index_matches_the_loss():
    assert streams.IGNORE_INDEX == IGNORE_INDEX


def test_training_streams_follow_documents(corpus):
    split, starts, doc_of = corpus
    sampler = streams.StreamSampler(split, starts, SEQ_LEN, n_segments=3, batch_size=2, seed=1)
    last_end = {}
    for step in range(12):
        batch = next(sampler)
        assert batch.inputs.shape == (2, 3 * SEQ_LEN) and batch.resets.shape == (2, 3)
        for row, s, inputs, targets, mask, reset in segments(batch):
            first, real = check_segment(split, starts, doc_of, inputs, targets, mask, reset)
            if (row in last_end) and not reset:  # a continuing stream picks up exactly where it stopped
                assert first == last_end[row], f"step {step} row {row} segment {s}: gap {last_end[row]} -> {first}"
            last_end[row] = first + real


def test_every_training_document_visited_with_reset(corpus):
    split, starts, doc_of = corpus
    sampler = streams.StreamSampler(split, starts, SEQ_LEN, n_segments=2, batch_size=1, seed=0)
    seen_starts = set()
    for _ in range(20):
        for _, _, inputs, targets, mask, reset in segments(next(sampler)):
            first, _ = check_segment(split, starts, doc_of, inputs, targets, mask, reset)
            if first in starts:
                assert reset, f"document at {first} started without a reset"
                seen_starts.add(first)
    long_enough = {int(start) for start, size in zip(starts, SIZES) if size >= 2}
    assert seen_starts == long_enough, f"visited document starts {sorted(seen_starts)}, expected {sorted(long_enough)}"


def test_resume_continues_exactly(corpus):
    split, starts, _ = corpus
    def make():
        return streams.StreamSampler(split, starts, SEQ_LEN, 2, 3, seed=5)

    original = make()
    for _ in range(4):
        next(original)
    state = original.state_dict()
    restored = make()
    restored.load_state_dict(state)
    for step in range(5):
        expected, got = next(original), next(restored)
        for name, a, b in zip(streams.StreamBatch._fields, expected, got):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} differs {step} steps after the resume")


def test_processes_take_their_own_rows(corpus):
    split, starts, _ = corpus
    whole = streams.StreamSampler(split, starts, SEQ_LEN, 2, 4, seed=3)
    parts = [streams.StreamSampler(split, starts, SEQ_LEN, 2, 4, seed=3, process_index=p, process_count=2)
             for p in range(2)]
    for _ in range(3):
        expected = next(whole)
        got = [next(part) for part in parts]
        for name, a, *b in zip(streams.StreamBatch._fields, expected, *got):
            np.testing.assert_array_equal(a, np.concatenate(b), err_msg=f"{name}: process rows differ")
    assert parts[0].state_dict() == parts[1].state_dict() == whole.state_dict()


def test_single_document_streams_spread_over_the_split():
    split = (np.arange(400) % 251).astype(np.uint8)
    sampler = streams.StreamSampler(split, None, SEQ_LEN, 1, 4, seed=0)
    gaps = np.diff(sorted(sampler.positions))
    assert (gaps == 100).all(), f"stream starts {sampler.positions} are not evenly spread"


def test_evaluation_streams_cover_each_target_once(corpus):
    split, starts, doc_of = corpus
    batch_size = 3
    batch = streams.evaluation_streams(split, starts, SEQ_LEN, batch_size)
    length = len(split) // batch_size
    counted = np.zeros(len(split), int)
    for row, _, inputs, targets, mask, reset in segments(batch):
        if not mask.any():  # padding segments at the end of shorter rows
            assert not reset and (targets == IGNORE_INDEX).all()
            continue
        first, real = check_segment(split, starts, doc_of, inputs, targets, mask, reset)
        assert row * length <= first and first + real < (row + 1) * length, f"row {row} leaves its stream"
        counted[first + 1 : first + real + 1] += 1
    assert counted.max() == 1, "a byte is predicted twice"
    uncounted = {i for i in range(batch_size * length) if counted[i] == 0}
    expected = {row * length for row in range(batch_size)} | {int(s) for s in starts if s < batch_size * length}
    assert uncounted == expected, f"unpredicted bytes {sorted(uncounted)}, expected {sorted(expected)}"


def test_document_starts_of_a_folder(tmp_path):
    sizes = [30, 0, 25, 41, 12] * 3 + [0]  # empty files, one of them last
    for i, size in enumerate(sizes):
        (tmp_path / f"f{i:02d}.txt").write_bytes(bytes([65 + i]) * size)
    corpus = data.read_corpus(tmp_path, cache_dir=tmp_path / ".cache")
    assert {name: list(s) for name, s in streams.document_starts(tmp_path).items()} == \
        {name: list(s) for name, s in corpus.starts.items()}, "document_starts is read_corpus(...).starts"
    for name, split in corpus.splits.items():
        starts = streams.check_starts(split, corpus.starts[name], name)
        for start in starts:  # each document is one file: a single repeated letter
            end = starts[starts > start][0] if (starts > start).any() else len(split)
            assert len(set(split[start:end].tolist())) == 1, f"{name}: document at {start} spans files"
        assert len(starts) == len({int(v) for v in split}), f"{name}: {len(starts)} documents"
    single = data.read_corpus(tmp_path / "f00.txt", cache_dir=tmp_path / ".cache").starts
    assert all(list(starts) == [0] for starts in single.values()), f"a text file is one document, got {single}"


@pytest.mark.parametrize("starts, message", [([1], "increasing offsets from 0"), ([0, 5, 5], "increasing"),
                                             ([0, 99], "below its length")])
def test_bad_document_starts(starts, message):
    with pytest.raises(ValueError, match=message):
        streams.check_starts(np.zeros(10, np.uint8), np.array(starts))


def test_bad_sampler_arguments(corpus):
    split, starts, _ = corpus
    with pytest.raises(ValueError, match="batch_size"):
        streams.StreamSampler(split, starts, SEQ_LEN, 2, 3, 0, process_count=2)
    sampler = streams.StreamSampler(split, starts, SEQ_LEN, 2, 3, 0)
    with pytest.raises(ValueError, match="streams"):
        sampler.load_state_dict(dict(sampler.state_dict(), positions=[0]))
    with pytest.raises(ValueError, match=r"keys \{'positions', 'resets', 'seed', 'step'\}, got \['seed', 'step'\]"):
        sampler.load_state_dict({"seed": 0, "step": 0})
    with pytest.raises(ValueError, match=r"state\['step'\] must be an int >= 0, got -1"):
        sampler.load_state_dict(dict(sampler.state_dict(), step=-1))


def test_windows_are_a_batch_that_resets_before_segment_0():
    tokens = np.arange(2 * 11).reshape(2, 11)  # 10 inputs: segments of 4, 4 and a short 2
    batch = streams.StreamBatch.from_windows(tokens, SEQ_LEN)
    np.testing.assert_array_equal(batch.inputs, tokens[:, :-1])
    np.testing.assert_array_equal(batch.targets, tokens[:, 1:])
    assert batch.mask is None, "no mask given: every token is real"
    np.testing.assert_array_equal(batch.resets, [[True, False, False]] * 2)
    continued = streams.StreamBatch.from_windows(tokens, SEQ_LEN, reset=False)
    assert not continued.resets.any(), "reset=False: the rows continue from the memories given"
    whole = np.ones((2, 11), bool)
    whole[0, 5:] = False
    np.testing.assert_array_equal(streams.StreamBatch.from_windows(tokens, SEQ_LEN, whole).mask, whole[:, :-1])
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 11\) or \(2, 10\), got \(2, 3\)"):
        streams.StreamBatch.from_windows(tokens, SEQ_LEN, whole[:, :3])
    with pytest.raises(ValueError, match=r"tokens must have shape .* got \(2, 1\)"):
        streams.StreamBatch.from_windows(tokens[:, :1], SEQ_LEN)
