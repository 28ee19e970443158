"""Smoke test of the benchmark harness (not a timing test) and checks of the analytic FLOP count."""

from __future__ import annotations

import json

import pytest

from ct_jax import flops
from ct_jax.bench import common, harness
from ct_jax.bench import report as bench_report
from ct_jax.bench.floor import floor_at_batch
from ct_jax.config import ModelConfig

TINY = dict(num_tokens=32, dim=16, depth=1, seq_len=8, mem_len=8, cmem_len=2, cmem_ratio=4, heads=2)


def test_memory_schedule_follows_the_reference_growth():
    # seq_len 6, mem_len 10, ratio 4: evictions of 2 (padded by 2 -> 1 slot), then 6 (+2 -> 2 slots)
    config = ModelConfig(num_tokens=8, dim=8, seq_len=6, depth=1, heads=1, mem_len=10, cmem_len=3, cmem_ratio=4)
    assert flops.memory_schedule(config, 4) == [(0, 0, 0), (6, 0, 1), (10, 1, 2), (10, 3, 2)]


def test_flops_of_one_segment_by_hand():
    # one layer with memory (4 valid slots + 1 compressed), residual joins, no GLU
    kwargs = dict(num_tokens=10, dim=4, seq_len=2, depth=1, heads=2, mem_len=4, cmem_len=1, cmem_ratio=4,
                  gru_gated_residual=False)
    config = ModelConfig(**kwargs)
    b, t, d, keys = 3, 2, 4, 2 + 4 + 1
    got = flops.segment_flops(config, b, mem=4, cmem=1, compressed=0, training=False)
    assert got["attention projections"].forward == 2 * b * t * d * d * 2 + 2 * b * keys * d * 2 * d
    assert got["attention scores and values"].forward == 2 * (2 * b * 2 * t * keys * 2)  # heads 2, dim_head 2
    assert got["relative positions"].forward == 2 * b * 2 * t * keys * 2
    assert got["feed-forward"].forward == 2 * b * t * d * 4 * d * 2
    assert got["logits"].forward == 2 * b * t * d * 10
    assert got["gated residuals"].forward == 0 and got["memory compression"].forward == 0
    assert all(f.backward == 0 for f in got.values()), "eval has no backward"
    train = flops.segment_flops(config, b, mem=4, cmem=1, compressed=0, training=True)
    assert train["feed-forward"].backward == 2 * train["feed-forward"].forward


def test_training_flops_count_the_aux_path_only_when_something_is_compressed():
    per = flops.run_flops(TINY, batch=2, segments=3, training=True)
    assert per["reconstruction loss"].forward > 0 and per["memory compression"].backward > 0
    first = flops.run_flops(TINY, batch=2, segments=1, training=True)  # nothing evicted yet
    assert first["reconstruction loss"].total == 0 and first["memory compression"].total == 0
    assert flops.total_flops(TINY, 2, 3, training=True) > 3 * flops.total_flops(TINY, 2, 3, training=False) * 0.9


def test_the_floor_of_a_batched_step_reads_the_weights_once_and_each_rows_cache():
    floor = dict(weights_bytes=1000, cache_bytes=100, sum_gbps=2.0, gemv_gbps=1.0, floor_ms_sum=0.0, floor_ms_gemv=0.0)
    at = floor_at_batch(floor, 8)
    assert at["cache_bytes"] == 800 and at["batch"] == 8
    assert at["floor_ms_sum"] == pytest.approx(1800 / 2.0 / 1e6) and at["floor_ms_gemv"] == pytest.approx(1800 / 1e6)


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
def test_parse_config_names_json_and_errors(tmp_path):
    assert common.parse_config("S").model["dim"] == 256
    spec = dict(name="tiny", model=TINY, batch=2, segments=2)
    assert common.parse_config(json.dumps(spec)).segments == 2
    (tmp_path / "c.json").write_text(json.dumps(spec))
    assert common.parse_config(str(tmp_path / "c.json")).name == "tiny"
    with pytest.raises(ValueError, match="config must be one of"):
        common.parse_config("XL")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        common.BenchConfig("x", TINY, batch=0)
    with pytest.raises(TypeError, match="batch must be an int, got 2.0"):
        common.BenchConfig("x", TINY, batch=2.0)
    with pytest.raises(ValueError, match=r"targets\['cpu'\] has unknown kinds \['speed'\]"):
        common.BenchConfig("x", TINY, batch=2, targets=dict(cpu=dict(speed=1.0)))


def test_targets_come_from_the_config_not_its_name():
    assert common.CONFIGS["M"].targets["cpu"]["memory"] == 1.0
    named_m = common.parse_config(json.dumps(dict(name="M", model=TINY, batch=2)))
    assert named_m.targets == {}, "a JSON config named M must not inherit M's targets"
    spec = dict(name="t", model=TINY, batch=2, targets=dict(cpu=dict(train=2.0)))
    assert common.BenchConfig(**common.parse_config(json.dumps(spec)).to_json()).targets == spec["targets"]


def test_run_refuses_a_gpu_run_without_a_gpu_before_measuring(tmp_path):
    bench = common.BenchConfig("tiny", TINY, batch=2)
    with pytest.raises(RuntimeError, match=r"device='gpu' needs a GPU for both frameworks: JAX's backend is 'cpu'"):
        harness.run([bench], harness.RunOptions(device="gpu"), tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written before the inputs are checked"
    with pytest.raises(ValueError, match="configs must share a dtype"):
        harness.run([bench, common.BenchConfig("b", TINY, batch=2, dtype="bfloat16")], harness.RunOptions(), tmp_path)


@pytest.mark.slow
def test_harness_runs_every_row_on_a_tiny_config(tmp_path):
    """One repetition of everything, peak-memory subprocesses included; checks the outputs, not the speed."""
    bench = common.BenchConfig("tiny", TINY, batch=2, segments=2, prime=5, generate=4,
                               targets=dict(cpu=dict(train=1e-3, memory=1e3)))
    options = harness.RunOptions(threads=1, reps=1, warmup=0, compile_segments=(2, 3), matmul_sizes=(64,),
                                 fused=True, generation_seq_lens=(16,), generation_batches=(3,), log=print)
    record = harness.run([bench], options, tmp_path)
    rec = record["configs"]["tiny"]
    for kind in ("train", "eval"):
        assert {"jax", "jax_fused", "torch"} <= set(rec[kind]), f"{kind} is missing a framework: {sorted(rec[kind])}"
    for fw in ("jax", "jax_fused", "jax_bf16", "torch"):
        assert rec["generation"][fw].get("tokens_per_s", 0) > 0, (fw, rec["generation"])
    assert rec["generation_at"]["16"]["model"]["seq_len"] == 16 and rec["generation_at"]["16"]["torch"]["median"] > 0
    assert rec["decode_floor"]["bfloat16"]["weights_bytes"] * 2 == rec["decode_floor"]["float32"]["weights_bytes"]
    batched = rec["generation_batched"]["3"]
    assert batched["jax"]["tokens_per_s"] > 0 and batched["torch"]["tokens_per_s"] > 0, batched
    assert batched["floor"]["cache_bytes"] == 3 * rec["decode_floor"]["float32"]["cache_bytes"]
    assert set(rec["compile"]) == {"2", "3"}
    streaming = rec["streaming"]
    assert streaming["ratio"] == streaming["streams"]["median"] / streaming["windows"]["median"] > 0
    assert all(rec["peak_memory"][fw]["step_mib"] > 0 for fw in ("jax", "torch")), rec["peak_memory"]
    assert set(rec["decode_profile"]) == {"top_k", "greedy"}
    table = bench_report.markdown(record)
    assert "tiny: where a decoded token's time goes (batch 1, float32, greedy)" in table
    body = [line.split(" | ") for line in table.splitlines() if line.startswith("| tiny")]
    # train, eval, generation (at 8, at batch 3 and its floor, at 16, bf16), decoding vs floor (float32, bf16),
    # streams vs windows, compile, memory, FLOP/s
    assert len(body) == 13, table
    jax_only = ("compile", "generation, bfloat16", "decoding ms", "train step with the memory")  # JAX-only rows
    for cells in body:  # | config | measurement | ct_jax | ct_jax fused | ct_torch_ref | upstream? | ratio | target |
        torch_cell = () if cells[1].startswith(jax_only) else (cells[4],)
        assert "—" not in (cells[2], *torch_cell, cells[-3]), f"unfilled row: {cells}"
    fused_rows = ("train step,", "eval forward", "generation, tok/s", "model GFLOP/s")
    assert "—" not in [cells[3] for cells in body if cells[1].startswith(fused_rows)], table
    targets = {cells[1].split(",")[0]: cells[-2] for cells in body}
    assert targets["train step"] == "≥ 0.001x" and targets["train step host memory"] == "≤ 1000", targets
    assert targets["eval forward"] == "—", "only the config's own targets are shown"
    assert targets["train step with the memory carried across steps (streams ÷ windows"] == "≤ 1.03", targets
    bench_report.write_json(record, tmp_path / "bench.json")
    bench_report.bar_chart(record, tmp_path / "bench.png")
    assert json.loads((tmp_path / "bench.json").read_text())["configs"]["tiny"]["config"]["batch"] == 2
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_decode_profile_charges_each_part_and_greedy_skips_the_draw():
    import numpy as np
    from flax import nnx

    from ct_jax.bench.decode_profile import decode_profile
    from ct_jax.model import CompressiveTransformer

    model = CompressiveTransformer(**TINY, rngs=nnx.Rngs(0))
    prime = np.random.default_rng(0).integers(0, TINY["num_tokens"], (1, 11)).astype(np.int32)
    found = {name: decode_profile(model, prime, 12, reps=1, temperature=t) for name, t in (("top_k", 1.0),
                                                                                          ("greedy", 0.0))}
    parts = {name: {row["part"]: row for row in profile["parts"]} for name, profile in found.items()}
    for name, profile in found.items():
        assert 0 < profile["ops_ms_per_token"] <= profile["traced_ms_per_token"], profile
        for part in ("window_forward/attention (matmul)", "cached_call/attention (matmul)",
                     "cached_call/feed_forward (matmul)", "bookkeeping/sampling (other)"):
            assert parts[name][part]["ops_per_token"] > 0, (name, part, sorted(parts[name]))
    # a greedy draw is one argmax: the filter and the categorical draw's ops do not run
    assert parts["greedy"]["bookkeeping/sampling (other)"]["ops_per_token"] < \
        parts["top_k"]["bookkeeping/sampling (other)"]["ops_per_token"] / 4, parts
    table = bench_report.decode_profile_markdown(found["greedy"], floor_ms=1.0, top=3)
    assert table.count("\n| ") == 6 and "more parts" in table and "outside any op" in table, table
    assert found["greedy"]["ms_per_token"] > 0


def test_profile_categories_name_both_frameworks_ops():
    from ct_jax.bench import profiles

    expected = {"aten::mm": "matmul", "ynn_fusion": "matmul", "dot": "matmul", "aten::native_layer_norm": "norm",
                "copy_bitcast_fusion": "copies, transposes, pads", "aten::cat": "copies, transposes, pads",
                "multiply_add_fusion": "elementwise", "aten::sigmoid": "elementwise", "aten::_softmax": "softmax",
                "input_reduce_fusion": "reductions", "while": "other"}
    assert {name: profiles.category(name) for name in expected} == expected


@pytest.mark.slow
def test_profiles_of_one_train_step_per_framework():
    from ct_jax.bench import profiles

    bench = common.BenchConfig("tiny", TINY, batch=2, segments=2)
    found = dict(torch=profiles.torch_train_profile(bench, threads=1), jax=profiles.jax_train_profile(bench))
    for name, profile in found.items():
        assert profile["total_ms"] > 0 and profile["by_category"].get("matmul", 0) > 0, (name, profile["by_category"])
        assert abs(sum(profile["by_category"].values()) - profile["total_ms"]) < 1e-6 * profile["total_ms"] + 1e-9
    table = profiles.markdown(found, top=3)
    assert table.startswith("| category | torch, ms (share) | jax, ms (share) |") and "| matmul |" in table, table
