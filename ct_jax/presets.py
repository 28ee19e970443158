"""The paper's model and training settings (Rae et al. 2019, Section 5 and Table 3-6),
as `ModelConfig` and `TrainConfig` keyword dicts; `scripts/train.py --preset NAME`; and the
main job, the defaults of `scripts/train.py`, with `train_defaults` merging a preset into them.

Where the paper is silent (width, heads, dropout, batch) Transformer-XL's settings for
the same data stand in. Deviations forced by this implementation are noted per preset.
Optimiser (all): Adam, linear warmup then cosine decay to 1e-6 from a 3e-4 peak, gradient
clipping to global norm 0.1 ("crucial" in the paper). The paper warms up from 1e-6; the
schedule here warms up from 0 (one step of difference in practice).
"""

from __future__ import annotations

import copy
from typing import Any

# The paper-faithful options every preset uses: Algorithm 2's attention reconstruction of
# exactly the evicted memories, no silently dropped slot, Transformer-XL positions.
PAPER_OPTIONS = dict(
    compression="conv", reconstruction_target="evicted", aux_loss="attention",
    eviction_padding="exact", relative_positions="sinusoidal",
    # The paper's model is a plain (pre-norm here) Transformer-XL stack: no GRU gating, no
    # enhanced recurrence (upstream's additions), every layer with memory.
    gru_gated_residual=False, enhanced_recurrence=False, memory_layers=None,
)
PEAK_LR, FINAL_LR = 3e-4, 1e-6


def _train(warmup: int, decay: int, batch_size: int) -> dict[str, Any]:
    return dict(
        optimizer="adam", learning_rate=PEAK_LR, schedule="cosine", warmup_steps=warmup, steps=warmup + decay,
        final_lr_ratio=FINAL_LR / PEAK_LR, grad_clip_norm=0.1, batch_size=batch_size,
    )


# enwik8: 24 layers, window = memory = 768, compressed memory 1152, rate 3 (0.97 bpc);
# width 1024, 8 heads as Transformer-XL's 24-layer enwik8 model. The paper evaluates with a
# compressed memory of 3072: build the eval model with cmem_len=3072 and load the weights
# (sinusoidal positions make that possible). Character level: 4k warmup, 100k decay.
ENWIK8: dict[str, dict[str, Any]] = dict(
    model=dict(num_tokens=256, dim=1024, depth=24, heads=8, seq_len=768, mem_len=768, cmem_len=1152,
               cmem_ratio=3, ff_dropout=0.1, attn_layer_dropout=0.1, **PAPER_OPTIONS),
    train=_train(4_000, 100_000, batch_size=22),
)

# WikiText-103: 18 layers, window 512, memory 500, compressed 1500, rate 4 (17.1 test ppl);
# width 1024, 16 heads as Transformer-XL large. mem_len is 512, not 500: this model needs
# mem_len >= seq_len (the paper's 512/512/512 run is reported too). Word level (267,735
# words; scripts/train.py reads bytes, bring your own tokenizer): 16k warmup, 500k decay.
# Adaptive input and softmax with Transformer-XL's WT103 cutoffs and div_val 4 (untied here).
WIKITEXT103: dict[str, dict[str, Any]] = dict(
    model=dict(num_tokens=267_735, dim=1024, depth=18, heads=16, seq_len=512, mem_len=512, cmem_len=1500,
               cmem_ratio=4, ff_dropout=0.2, attn_layer_dropout=0.2, adaptive_cutoffs=[20_000, 40_000, 200_000],
               adaptive_div_val=4, **PAPER_OPTIONS),
    train=_train(16_000, 500_000, batch_size=128),
)

# PG-19: 36 layers, window = memory = compressed = 512, rate 2 (33.6 test ppl), 32k subword
# vocabulary, batch 512; width 1024, 8 heads. Word-level schedule: 16k warmup, 500k decay.
PG19: dict[str, dict[str, Any]] = dict(
    model=dict(num_tokens=32_000, dim=1024, depth=36, heads=8, seq_len=512, mem_len=512, cmem_len=512,
               cmem_ratio=2, ff_dropout=0.1, attn_layer_dropout=0.1, **PAPER_OPTIONS),
    train=_train(16_000, 500_000, batch_size=512),
)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"enwik8": ENWIK8, "wikitext103": WIKITEXT103, "pg19": PG19}
# The tokenizer each preset trains with (scripts/train.py --tokenizer, ct_jax.tokenizers): WikiText-103 is
# word level as Transformer-XL builds it, PG-19 a 32k subword vocabulary (SentencePiece trained on the
# training split here); enwik8, long_range and the main job read bytes.
TOKENIZERS = {"wikitext103": "words", "pg19": "spm-train:32000"}


def default_tokenizer(preset: str | None = None) -> str:
    """The `--tokenizer` value of `preset` (None: the main job): bytes unless `TOKENIZERS` names another."""
    return TOKENIZERS.get(preset, "bytes") if preset is not None else "bytes"


def fit_cutoffs(model: dict[str, Any], num_tokens: int) -> tuple[dict[str, Any], str | None]:
    """(`model` kwargs with `num_tokens` and the `adaptive_cutoffs` below it, a note of what was dropped or None).

    A preset's cutoffs (WikiText-103's 20000, 40000, 200000) assume its vocabulary; with a smaller one (another
    corpus, a shrunken run) the cutoffs at or above `num_tokens` go, and with none left the softmax is full
    (and `adaptive_div_val` 1).
    """
    model = dict(model, num_tokens=num_tokens)
    cutoffs = model.get("adaptive_cutoffs")
    if not cutoffs:
        return model, None
    kept = [cutoff for cutoff in cutoffs if cutoff < num_tokens]
    if len(kept) == len(cutoffs):
        return model, None
    model["adaptive_cutoffs"] = kept or None
    if not kept:
        model["adaptive_div_val"] = 1  # no clusters left to narrow
    return model, (f"adaptive_cutoffs {list(cutoffs)} reach past the vocabulary of {num_tokens:,} tokens: using "
                   f"{kept or 'none (a full softmax)'}")


def get(name: str) -> dict[str, dict[str, Any]]:
    """A copy of preset `name`: {"model": ModelConfig kwargs, "train": TrainConfig kwargs}."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(repr(p) for p in PRESETS)}; got {name!r}")
    return copy.deepcopy(PRESETS[name])

# Long-range use (docs/long-range.md): model options and training fields only, no sizes;
# combine with any size. Beyond the paper and upstream: the compression conv gets no auxiliary
# loss and is trained by the LM loss alone, through the memory of each training row (the
# paper's BPTT, `memory_gradients`: the gradient of a later query reaches the conv and what
# earlier segments wrote), on the paper's plain pre-norm Transformer-XL stack with
# sinusoidal positions; lr 3e-3 is what the small (dim 64) models of the benchmark train at.
LONG_RANGE: dict[str, dict[str, Any]] = dict(
    model=dict(compression="conv", aux_loss="none", relative_positions="sinusoidal",
               gru_gated_residual=False, enhanced_recurrence=False),
    train=dict(optimizer="adam", learning_rate=3e-3, warmup_steps=50, grad_clip_norm=0.5, memory_gradients=True),
)


# The main job (scripts/train.py with no flags): a small model (0.28M parameters; segments of
# 64 bytes, memory 64 + 16 compressed) streamed through the documents, memory carried across
# steps, 2000 steps of 16 x 2 segments (4.1M bytes) with a small model's learning rate (not
# upstream's 1e-4). Sized for under 4 minutes on 2 idle CPU cores, whole-split validation
# included: measured 2.44 bits/byte after 1600 steps (265 s of CPU time, ~170 s on an idle
# 2-core machine).
MAIN_JOB: dict[str, dict[str, Any]] = dict(
    model=dict(num_tokens=256, dim=64, depth=2, seq_len=64, mem_len=64, cmem_len=16, cmem_ratio=4, heads=4),
    train=dict(batch_size=16, n_segments=2, steps=2000, learning_rate=3e-3, schedule="cosine", warmup_steps=50,
               data_order="streams", eval_every=250, eval_segments=16, eval_batches=4, checkpoint_every=250),
)
# The default corpus is cut to its first 6 MB of files (whole files: 5.5 MB train, 0.5 MB
# validation): the main job sees 4 MB, and its final validation runs over the whole split.
MAIN_JOB_CORPUS_BYTES = 6_000_000
TRAIN_PRESETS = sorted([*PRESETS, "long_range"])  # what `scripts/train.py --preset` takes


def train_defaults(preset: str | None = None) -> dict[str, dict[str, Any]]:
    """scripts/train.py's defaults: the main job, or `preset` over it ({"model": ..., "train": ...}).

    A paper preset brings its whole model and its training fields (the main job's fill the rest);
    long_range brings options only, so the main job's sizes stay.
    """
    job = copy.deepcopy(MAIN_JOB)
    if preset is None:
        return job
    if preset == "long_range":
        chosen = copy.deepcopy(LONG_RANGE)
        return dict(model=dict(job["model"], **chosen["model"]), train=dict(job["train"], **chosen["train"]))
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(repr(p) for p in TRAIN_PRESETS)}; got {preset!r}")
    chosen = get(preset)
    return dict(model=chosen["model"], train=dict(job["train"], **chosen["train"]))
