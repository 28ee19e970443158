"""The text benchmark (ct_jax.text_bench): the compared models are equal in cost as the plan says, the
tables report what the records hold, and a trained run's measures agree with the library's evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ct_jax.text_bench import plan, report


def test_the_transformer_xls_match_the_ct_in_attended_slots_and_in_span():
    ct, same_slots, same_span = plan.variants()
    assert ct.cmem_len > 0 and same_slots.cmem_len == same_span.cmem_len == 0
    assert same_slots.attended == ct.attended and same_slots.covered < ct.covered
    assert same_span.covered == ct.covered and same_span.attended > ct.attended
    for variant in (same_slots, same_span):  # the same network and options, memory aside
        assert {k: v for k, v in variant.options.items()} == {
            k: v for k, v in ct.options.items() if k not in ("compression", "aux_loss")}
        assert variant.train == ct.train


def test_runs_are_whole_seeds_first_and_each_has_its_own_folder():
    runs = plan.runs(["XS", "S"], ["bytes", "spm-train:512"], [0, 1], 100)
    assert len(runs) == 2 * 2 * 2 * 3 and [r.seed for r in runs[:12]] == [0] * 12
    assert len({r.folder for r in runs}) == len(runs)
    with pytest.raises(ValueError, match="variant must be one of"):
        plan.variant_named("nope")


def _record(variant: str, seed: int, bpb: float, size: str = "S", **measured: float) -> dict:
    return dict(size=size, tokenizer="bytes", variant=variant, seed=seed, steps=100, bpb=bpb, **measured)


def test_tables_give_medians_spreads_and_per_seed_gaps():
    ct_name, slots_name, _ = (v.name for v in plan.variants())
    records = [_record(ct_name, seed, bpb, nocmem_bpb=bpb * 1.05) for seed, bpb in enumerate((1.90, 2.00, 1.95))]
    records += [_record(slots_name, seed, bpb) for seed, bpb in enumerate((2.00, 2.00, 2.10))]
    text = report.tables(records)
    assert f"| {ct_name} | 3 | 1.950 (1.900-2.000) | - | 2.047 (1.995-2.100) (+5.0%) |" in text
    # per-seed gaps (CT - TXL) / TXL: -5.0%, 0.0%, -7.1%; the median is -5.0%
    assert f"| {slots_name} | 3 | 2.000 (2.000-2.100) | -5.0% (-7.1 to +0.0) |" in text
    assert "| S (64x2) | bytes | 100 | 1.950 (1.900-2.000) | -5.0% (3 seeds) | - | +5.0% |" in text


def test_measures_of_a_model_agree_with_the_library_evaluation():
    from flax import nnx

    from ct_jax.evaluation import evaluate_stream
    from ct_jax.model import CompressiveTransformer
    from ct_jax.text_bench.measure import EDGES, EVAL_STREAMS, measure
    from ct_jax.tokenized import SplitCounts

    model = CompressiveTransformer(num_tokens=64, dim=16, depth=1, heads=2, seq_len=plan.SEQ_LEN, mem_len=plan.MEM_LEN,
                                   cmem_len=plan.CMEM_LEN, cmem_ratio=plan.RATIO, relative_positions="sinusoidal",
                                   rngs=nnx.Rngs(0))
    split = np.random.default_rng(0).integers(0, 64, size=EVAL_STREAMS * plan.SEQ_LEN * 12).astype(np.uint8)
    starts = np.array([0, len(split) // 2])
    record = measure(model, split, starts, SplitCounts(len(split), 2 * len(split)))
    bits = evaluate_stream(model, split, EVAL_STREAMS, document_starts=starts, progress=False)
    assert record["bits_per_token"] == pytest.approx(bits, rel=1e-6)
    assert record["bpb"] == pytest.approx(bits / 2, rel=1e-6), "bits per byte spreads the NLL over the bytes"
    assert len(record["bucket_bits"]) == len(EDGES) + 1 and sum(record["bucket_count"]) > 0
    assert not math.isnan(record["bucket_bits"][0])
    assert np.allclose(np.sum(record["attention_mass"], axis=1), 1.0, atol=1e-4)
    for prefix in ("nocmem_", "nomem_", "longer_"):
        assert np.isfinite(record[f"{prefix}bpb"]), prefix
    assert record["nomem_bpb"] != record["bpb"], "emptying the memory changes the loss of a model that reads it"
