"""Measures a trained text-benchmark model on the whole validation split, memory carried: bits per
byte, bits per token by a token's distance from its document's start, the same with the compressed
memory (or all memory) emptied before every segment, each layer's attention mass, and a compressive
model evaluated with a 4x longer compressed memory than it was trained with."""

from __future__ import annotations

from typing import Any

import numpy as np

from ct_jax.evaluation import StreamEval, stream_eval
from ct_jax.loading import with_memory_lengths
from ct_jax.model import CompressiveTransformer
from ct_jax.text_bench.plan import CMEM_LEN, MEM_LEN, RATIO, SEQ_LEN
from ct_jax.tokenized import SplitCounts, split_measures

# Distance from the document's start, tokens: every model's window; the CT's plain memory reach; the
# same-slot Transformer-XL's reach; the CT's (and the same-span Transformer-XL's) reach; the CT's reach
# with a 4x longer compressed memory at evaluation.
EDGES = (SEQ_LEN, SEQ_LEN + MEM_LEN, SEQ_LEN + MEM_LEN + CMEM_LEN, SEQ_LEN + MEM_LEN + CMEM_LEN * RATIO,
         SEQ_LEN + MEM_LEN + 4 * CMEM_LEN * RATIO)
EVAL_STREAMS = 16  # the validation split read as this many contiguous streams (as the main job validates)
LONGER = 4  # the compressed memory at evaluation, as a multiple of training's


def _summary(result: StreamEval, counts: SplitCounts, prefix: str) -> dict[str, Any]:
    """bits per byte and per token, and bits per token by distance bucket, keyed `PREFIX...`."""
    measured = split_measures(result.bits_per_token, counts)
    return {f"{prefix}bpb": measured.bits_per_byte, f"{prefix}bits_per_token": result.bits_per_token,
            f"{prefix}bucket_bits": list(result.bucket_bits), f"{prefix}bucket_count": list(result.bucket_count)}


def measure(model: CompressiveTransformer, split: np.ndarray, starts: np.ndarray,
            counts: SplitCounts) -> dict[str, Any]:
    """Every measure of `model` on `split` (a tokenized validation split with its document starts), as a
    flat record: `bpb`, `bits_per_token`, `bucket_bits` (per `EDGES` bucket), `attention_mass` (per layer:
    compressed memory, memory, segment), `nocmem_*` (compressed memory emptied), `nomem_*` (all memory
    emptied) and, for a compressive model, `longer_*` (compressed memory `LONGER`x at evaluation)."""

    def evaluate(evaluated: CompressiveTransformer, **options: Any) -> StreamEval:
        return stream_eval(evaluated, split, EVAL_STREAMS, document_starts=starts, bucket_edges=EDGES,
                           progress=False, **options)

    base = evaluate(model, attention_mass=True)
    record = {"bucket_edges": list(EDGES), **_summary(base, counts, ""),
              "attention_mass": np.asarray(base.attention_mass).tolist(),
              **_summary(evaluate(model, knockout="memory"), counts, "nomem_")}
    if model.config.cmem_len:
        record.update(_summary(evaluate(model, knockout="compressed"), counts, "nocmem_"))
        longer = with_memory_lengths(model, cmem_len=LONGER * model.config.cmem_len)
        record.update(_summary(evaluate(longer), counts, "longer_"))
    return record
