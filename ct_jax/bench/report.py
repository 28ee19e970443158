"""The benchmark record as a Markdown table (with each config's targets), a JSON file and a bar chart.

Cells hold measurements only; a framework or row not measured shows "—".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ct_jax.io import atomic_write

LABELS = dict(jax="ct_jax", jax_fused="ct_jax, fused attention", torch="ct_torch_ref", upstream="upstream 0.4.0")
OPTIONAL = ("jax_fused", "upstream")  # columns shown only when measured
STREAMING_TARGET = 1.03  # a streamed update may cost at most 3% over a fixed-window one


@dataclasses.dataclass
class Row:
    """One measurement of one config: a cell per framework, JAX's ratio, the target and whether it holds."""

    config: str
    measurement: str
    cells: dict[str, str]
    ratio: float | None = None  # JAX / ct_torch_ref (compile rows: 32 segments / 2 segments)
    ratio_text: str = "—"
    target: str = "—"
    met: bool | None = None
    advantage: float | None = None  # for the chart: > 1 means JAX is better

    @property
    def met_text(self) -> str:
        return "—" if self.met is None else ("yes" if self.met else "**no**")


def _throughput_cell(entry: dict[str, Any] | None, work: float) -> str:
    if not entry:
        return "—"
    return f"{work / entry['median']:,.0f} ({work / entry['max']:,.0f}–{work / entry['min']:,.0f})"


def rows(record: dict[str, Any]) -> list[Row]:
    """Table rows for every config of the record."""
    device = record["options"]["device"]
    peaks = record["matmul_peak"]
    out: list[Row] = []
    for name, rec in record["configs"].items():
        targets = rec["config"].get("targets", {}).get(device, {})
        tokens = rec["config"]["batch"] * rec["config"]["segments"] * rec["config"]["model"]["seq_len"]
        for kind, label in (("train", "train step, tok/s"), ("eval", "eval forward, tok/s")):
            entry = rec[kind]
            row = Row(name, label, {fw: _throughput_cell(entry.get(fw), tokens) for fw in LABELS})
            _ratio(row, entry["torch"]["median"] / entry["jax"]["median"], targets.get(kind))
            out.append(row)
        if "generation" in rec:
            out += _generation_rows(name, rec, targets)
        if "streaming" in rec:
            out.append(_streaming_row(name, rec["streaming"], tokens))
        if "compile" in rec:
            out.append(_compile_row(name, rec["compile"], targets))
        if "peak_memory" in rec:
            out += _memory_rows(name, rec["peak_memory"], targets)
        out.append(_flops_row(name, rec, peaks, targets))
    peak_row = Row("all", "dense matmul peak, GFLOP/s (best square size)",
                   dict(jax=f"{peaks['jax']['gflops']:,.1f}", torch=f"{peaks['torch']['gflops']:,.1f}"))
    ratio = peaks["jax"]["gflops"] / peaks["torch"]["gflops"]
    peak_row.ratio, peak_row.ratio_text = ratio, f"{ratio:.2f}"
    out.append(peak_row)
    return out


def _generation_rows(name: str, rec: dict[str, Any], targets: dict[str, float]) -> list[Row]:
    """Generation at b=1, at other seq_len and batches, in bfloat16, and ms per token against the floors."""
    out = []
    gen = rec["generation"]
    new = rec["config"]["generate"]
    label = f"generation, tok/s (b=1, {rec['config']['prime']}+{new})"
    row = Row(name, label, {fw: _throughput_cell(gen.get(fw), new) for fw in LABELS})
    _ratio(row, gen["torch"]["median"] / gen["jax"]["median"], targets.get("generation"))
    out.append(row)
    for seq_len, at in rec.get("generation_at", {}).items():
        model = at["model"]
        memory = f"mem {model['mem_len']}, cmem {model.get('cmem_len', '—')}"
        row = Row(name, f"generation at seq_len {seq_len} ({memory}), tok/s",
                  {fw: _throughput_cell(at.get(fw), new) for fw in LABELS})
        _ratio(row, at["torch"]["median"] / at["jax"]["median"], None)
        out.append(row)
    for batch, at in rec.get("generation_batched", {}).items():
        row = Row(name, f"generation at batch {batch}, tok/s (all rows)",
                  {fw: _throughput_cell(at.get(fw), int(batch) * new) for fw in LABELS})
        _ratio(row, at["torch"]["median"] / at["jax"]["median"], None)
        out.append(row)
        out.append(_floor_row(name, f"float32, batch {batch} (ms per step of {batch} tokens)", at["floor"],
                              1e3 * at["jax"]["median"] / new))
    if "jax_bf16" in gen:
        row = Row(name, "generation, bfloat16 decoding, tok/s (ratio: vs the reference in float32)",
                  dict(jax=_throughput_cell(gen["jax_bf16"], new)))
        _ratio(row, gen["torch"]["median"] / gen["jax_bf16"]["median"], None)
        out.append(row)
    for dtype, floor in rec.get("decode_floor", {}).items():
        entry = gen.get("jax" if dtype == "float32" else "jax_bf16")
        if entry:
            out.append(_floor_row(name, dtype, floor, 1e3 * entry["median"] / new))
    return out


def _streaming_row(name: str, streaming: dict[str, Any], tokens: int) -> Row:
    cell = (f"windows {_throughput_cell(streaming['windows'], tokens)}, "
            f"streams {_throughput_cell(streaming['streams'], tokens)}")
    row = Row(name, "train step with the memory carried across steps (streams ÷ windows, time), tok/s",
              dict(jax=cell))
    row.ratio, row.ratio_text = streaming["ratio"], f"{streaming['ratio']:.3f} (streams ÷ windows)"
    row.target, row.met = f"≤ {STREAMING_TARGET:g}", streaming["ratio"] <= STREAMING_TARGET
    return row


def _compile_row(name: str, compile_times: dict[str, Any], targets: dict[str, float]) -> Row:
    segs = sorted(compile_times, key=int)
    times = [compile_times[s]["total_s"] for s in segs]
    row = Row(name, f"compile train step, s ({' / '.join(segs)} segments)",
              dict(jax=" / ".join(f"{t:.1f}" for t in times), torch="—", upstream="—"))
    ratio = times[-1] / times[0]
    row.ratio, row.ratio_text = ratio, f"{ratio:.2f} ({segs[-1]} vs {segs[0]})"
    if "compile" in targets:
        row.target, row.met = f"≤ {targets['compile']:g}", ratio <= targets["compile"]
    return row


def _memory_rows(name: str, mem: dict[str, Any], targets: dict[str, float]) -> list[Row]:
    cells = {fw: f"{mem[fw]['step_mib']:,.0f} ({mem[fw]['peak_rss_mib']:,.0f})" if fw in mem else "—"
             for fw in LABELS}
    row = Row(name, "train step host memory, MiB above the framework's import RSS (peak RSS)", cells)
    ratio = mem["jax"]["step_mib"] / mem["torch"]["step_mib"]
    row.ratio, row.ratio_text, row.advantage = ratio, f"{ratio:.2f}", 1 / ratio
    if "memory" in targets:
        row.target, row.met = f"≤ {targets['memory']:g}", ratio <= targets["memory"]
    out = [row]
    if mem["jax"].get("device_peak_mib") is not None:
        cells = {fw: f"{mem[fw]['device_peak_mib']:,.0f}" if fw in mem else "—" for fw in LABELS}
        out.append(Row(name, "peak device memory of a train step, MiB", cells))
    return out


def _flops_row(name: str, rec: dict[str, Any], peaks: dict[str, Any], targets: dict[str, float]) -> Row:
    """Achieved model FLOP/s of the train step per framework, and its share of the matmul peak (MFU)."""
    flops = rec["flops"]["train_total"]
    cells, mfu = {}, {}
    for fw in LABELS:
        entry = rec["train"].get(fw)
        peak = peaks.get("jax" if fw.startswith("jax") else "torch", {}).get("gflops")
        if not entry or not peak:
            cells[fw] = "—"
            continue
        achieved = flops / entry["median"] / 1e9
        mfu[fw] = achieved / peak
        cells[fw] = f"{achieved:,.1f} ({100 * mfu[fw]:.0f}% of peak)"
    row = Row(name, f"model GFLOP/s, train ({flops / 1e9:,.1f} GFLOP/step)", cells)
    row.ratio, row.ratio_text = mfu["jax"] / mfu["torch"], f"{mfu['jax'] / mfu['torch']:.2f} (MFU)"
    if "train_mfu" in targets:
        row.target, row.met = f"JAX ≥ {100 * targets['train_mfu']:.0f}%", mfu["jax"] >= targets["train_mfu"]
    return row


def _floor_row(config: str, dtype: str, floor: dict[str, float], ms: float) -> Row:
    """ms per decoded token against the memory-bandwidth floor (bytes per token / bandwidth)."""
    mib = (floor["weights_bytes"] + floor["cache_bytes"]) / 2**20
    cell = (f"{ms:.2f} ms; floor {floor['floor_ms_sum']:.2f} ms ({mib:.1f} MiB at {floor['sum_gbps']:.1f} GB/s, "
            f"jnp.sum) or {floor['floor_ms_gemv']:.2f} ms (at {floor['gemv_gbps']:.1f} GB/s, (2,K)x(K,N))")
    row = Row(config, f"decoding ms per token vs floor, {dtype}", dict(jax=cell))
    row.ratio = ms / floor["floor_ms_sum"]
    row.ratio_text = f"{row.ratio:.2f}x floor (jnp.sum bandwidth)"
    return row


def decode_profile_markdown(profile: dict[str, Any], floor_ms: float | None = None, top: int = 15) -> str:
    """A `ct_jax.bench.decode_profile` record as a table: each part's ms per token and share of the traced
    wall time, then the time outside any op, and the floor if given."""
    traced = profile["traced_ms_per_token"]
    header = "| where (loop part/model part (op kind)) | ms per token | ops per token | share of traced time |"
    lines = [f"ms per token: {profile['ms_per_token']:.3f} untraced, {traced:.3f} traced"
             + (f"; floor {floor_ms:.3f} ({profile['ms_per_token'] / floor_ms:.2f}x)" if floor_ms else ""), "",
             header, "|---|---:|---:|---:|"]
    for row in profile["parts"][:top]:
        lines.append(f"| `{row['part']}` | {row['ms_per_token']:.3f} | {row['ops_per_token']:.1f} | "
                     f"{100 * row['ms_per_token'] / traced:.0f}% |")
    rest = profile["parts"][top:]
    if rest:
        ms = sum(row["ms_per_token"] for row in rest)
        lines.append(f"| {len(rest)} more parts | {ms:.3f} | {sum(r['ops_per_token'] for r in rest):.1f} | "
                     f"{100 * ms / traced:.0f}% |")
    outside = traced - profile["ops_ms_per_token"]
    lines.append(f"| outside any op (runtime: launches, loop conditions, branches) | {outside:.3f} | | "
                 f"{100 * outside / traced:.0f}% |")
    return "\n".join(lines)


def _ratio(row: Row, ratio: float, target: float | None) -> None:
    row.ratio, row.advantage, row.ratio_text = ratio, ratio, f"{ratio:.2f}x"
    if target is not None:
        row.target, row.met = f"≥ {target:g}x", ratio >= target


def markdown(record: dict[str, Any]) -> str:
    """The results table, then the conditions it was measured under."""
    table = rows(record)
    measured = {fw for rec in record["configs"].values() for fw in rec["train"]}
    frameworks = [fw for fw in LABELS if fw not in OPTIONAL or fw in measured]
    head = ["config", "measurement", *(LABELS[fw] for fw in frameworks), "JAX ÷ ref", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row.config, row.measurement, *(row.cells.get(fw, "—") for fw in frameworks),
                 row.ratio_text, row.target, row.met_text]
        lines.append("| " + " | ".join(cells) + " |")
    machine, options = record["machine"], record["options"]
    lines += [
        "",
        f"Throughput cells: median (min–max) over {options['reps']} interleaved repetitions after "
        f"{options['warmup']} warm-up; generation: at most 2 repetitions. —: not measured (torch runs "
        "eagerly, so it has no compile time; upstream's generation is not timed).",
        f"Machine: {machine['cpu']}, {machine['threads_used']} of {machine['cores_available']} cores used "
        f"(XLA pool from the CPU affinity, torch.set_num_threads({machine['threads_used']})); "
        f"device {options['device']}; jax {record['versions']['jax']}, torch {record['versions']['torch']}.",
        f"XLA_FLAGS: `{machine['xla_flags'] or '(none)'}`. JAX train path: ct_jax.training.make_train_step.",
        "Load average (1, 5, 15 min) at start {} and end {}.".format(
            *(", ".join(f"{x:.1f}" for x in record[k]) for k in ("load_average_start", "load_average_end"))),
    ]
    for name, rec in record["configs"].items():
        for sampling, profile in rec.get("decode_profile", {}).items():
            floor = rec["decode_floor"]["float32"]["floor_ms_sum"]
            lines += ["", f"{name}: where a decoded token's time goes (batch 1, float32, {sampling})", "",
                      decode_profile_markdown(profile, floor)]
    return "\n".join(lines)


def write_json(record: dict[str, Any], path: Path) -> None:
    """The whole record (every sample), written atomically."""
    text = json.dumps(record, indent=1, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def bar_chart(record: dict[str, Any], path: Path) -> None:
    """PNG of JAX's advantage over ct_torch_ref per row (log scale; > 1: JAX better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    table = [row for row in rows(record) if row.advantage is not None]
    labels = [f"{row.config}: {row.measurement.split(',')[0]}" for row in table]
    values = [row.advantage for row in table]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(table) + 1.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(table)), values, color=colors)
    ax.set_yticks(range(len(table)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100) if min(values) / 2 <= t <= max(values) * 2]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=1)
    for index, value in enumerate(values):
        ax.text(value, index, f" {value:.2f}x", va="center")
    ax.set_xlabel("JAX advantage over ct_torch_ref (throughput ratio; memory: ref ÷ JAX)")
    ax.set_title(f"ct_jax vs ct_torch_ref, {record['options']['device']}, {record['machine']['threads_used']} threads")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
