"""Training-loss segmenting and sampling around a CompressiveTransformer (upstream 0.4.0's
AutoregressiveWrapper, with its defects fixed)."""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .model import CompressiveTransformer

Return = namedtuple("Return", ["loss", "aux_loss", "is_last_batch"])


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus filter as upstream: keeps the most likely tokens up to and including the
    first whose cumulative probability exceeds 1 - thres (always at least one); others -inf.
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cum_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum_probs > (1 - thres)
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False  # the most likely token always stays
    sorted_logits[remove] = float("-inf")
    return sorted_logits.scatter(-1, sorted_indices, sorted_logits)


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keeps the k = int((1 - thres) * vocab) largest logits, at least 1 (upstream could keep
    0 on small vocabularies, which made sampling fail); others -inf."""
    vocab = logits.shape[-1]
    k = min(vocab, max(1, int((1 - thres) * vocab)))
    val, ind = torch.topk(logits, k)
    probs = torch.full_like(logits, float("-inf"))
    probs.scatter_(-1, ind, val)
    return probs


_FILTERS: dict[str, Callable[..., Tensor]] = {"top_k": top_k, "top_p": top_p}


def _resolve_filter(filter_logits_fn: Any) -> Callable[..., Tensor] | None:
    if filter_logits_fn is None or callable(filter_logits_fn):
        return filter_logits_fn
    if isinstance(filter_logits_fn, str) and filter_logits_fn in _FILTERS:
        return _FILTERS[filter_logits_fn]
    raise ValueError(
        f"filter_logits_fn must be a callable, 'top_k', 'top_p' or None, got {filter_logits_fn!r}"
    )


def _pad_list(seqs: Sequence[Tensor], value: int) -> tuple[Tensor, Tensor]:
    """List of 1-D tensors -> ((b, max_len) right-padded with value, (b,) lengths)."""
    seqs = list(seqs)
    if not seqs or not all(isinstance(s, Tensor) and s.ndim == 1 for s in seqs):
        raise TypeError("x must be a (b, n) tensor or a non-empty list of 1-D token tensors")
    lengths = torch.tensor([len(s) for s in seqs], device=seqs[0].device)
    return pad_sequence(seqs, batch_first=True, padding_value=value), lengths


def _lengths_mask(lengths: Tensor, width: int) -> Tensor:
    """(b,) lengths -> (b, width) bool, True at the first lengths[i] positions of row i."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


class AutoregressiveWrapper(nn.Module):
    """Language-model loss over segments of `net.seq_len`, memory carried, and sampling."""

    def __init__(
        self,
        net: CompressiveTransformer,
        ignore_index: int = -100,
        pad_value: int = 0,
        memory_gradients: bool = False,
    ):
        """memory_gradients: within one call, the memory carried between segments keeps its
        graph (the paper's BPTT row), so a later segment's loss trains what earlier ones
        stored and how it was compressed. Sum the yielded losses and call backward once
        (a backward per segment would free the graph the next segment still needs)."""
        super().__init__()
        if not isinstance(memory_gradients, bool):
            raise TypeError(f"memory_gradients must be a bool, got {memory_gradients!r}")
        self.memory_gradients = memory_gradients
        self.pad_value = pad_value
        self.ignore_index = ignore_index
        self.net = net
        self.seq_len = net.seq_len

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable[..., Tensor] | str | None = top_k,
        filter_thres: float = 0.9,
        **kwargs: Any,
    ) -> Tensor:
        """Samples `seq_len` new tokens after `start_tokens` ((b, p) or (p,), p >= 1).

        Windows, as upstream: the prime is cut into windows of the model's seq_len S from
        the left; all but the last are run in turn and only update the memory (a prime of
        exactly k*S tokens keeps its last full window as the current one). The current
        window (1..S tokens) then grows by one sampled token per step; each step runs the
        model on the window and samples from the logits of its last position. The memory
        is updated only when the window is full (S tokens), after which the window
        restarts at the one token sampled from it. Every step returns the memory (which
        enhanced recurrence rolls even for a short window, as upstream).

        Returns exactly `seq_len` new tokens for every prime length (upstream returned
        too few for primes longer than S), fewer only if `eos_token` is given and every
        row samples it at the same step (that step's token is included). Shape (b, n), or
        (n,) for a 1-D prime.

        temperature: 0 means greedy (argmax, no filtering or sampling).
        filter_logits_fn: a callable (logits, thres=...) -> logits, "top_k", "top_p" or
            None (no filtering). kwargs: `mask` ((b, p) bool) and anything else for the net.
        """
        filter_fn = _resolve_filter(filter_logits_fn)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(
                f"seq_len (number of tokens to generate) must be an int >= 0, got {seq_len!r}"
            )
        if not isinstance(start_tokens, Tensor) or start_tokens.ndim not in (1, 2):
            raise ValueError("start_tokens must be a (b, p) or (p,) tensor of token ids")
        num_dims = start_tokens.ndim
        prime = start_tokens[None, :] if num_dims == 1 else start_tokens
        b, prime_len = prime.shape
        if prime_len < 1:
            raise ValueError("start_tokens must hold at least one token, got an empty prime")

        mask = kwargs.pop("mask", None)
        if mask is None:
            mask = torch.ones_like(prime, dtype=torch.bool)
        elif num_dims == 1 and mask.ndim == 1:
            mask = mask[None, :]
        if tuple(mask.shape) != (b, prime_len):
            raise ValueError(
                f"mask must have shape {(b, prime_len)} like the prime, got {tuple(mask.shape)}"
            )

        was_training = self.net.training
        self.net.eval()
        try:
            window_len = self.seq_len
            n_full_windows = (prime_len - 1) // window_len  # windows before the current one
            memories = None
            for start in range(0, n_full_windows * window_len, window_len):
                _, memories, _ = self.net(
                    prime[:, start : start + window_len], memories=memories,
                    mask=mask[:, start : start + window_len], **kwargs,
                )

            window = prime[:, n_full_windows * window_len :]
            window_mask = mask[:, n_full_windows * window_len :]
            input_len = window.shape[1]
            generated = []
            for _ in range(seq_len):
                logits, memories, _ = self.net(
                    window[:, -input_len:], memories=memories, mask=window_mask[:, -input_len:],
                    **kwargs,
                )
                logits = logits[:, -1, :]
                if temperature == 0:
                    sample = logits.argmax(dim=-1, keepdim=True)
                else:
                    if filter_fn is not None:
                        logits = filter_fn(logits, thres=filter_thres)
                    probs = F.softmax(logits / temperature, dim=-1)
                    sample = torch.multinomial(probs, 1)
                sample = sample.to(prime.dtype)
                generated.append(sample)

                # Only the last window_len tokens can be read again.
                window = torch.cat((window, sample), dim=-1)[:, -window_len:]
                window_mask = F.pad(window_mask, (0, 1), value=True)[:, -window_len:]
                # A full window (which updated the memory) restarts at the new token.
                input_len = input_len % window_len + 1

                if eos_token is not None and (sample == eos_token).all():
                    break
        finally:
            self.net.train(was_training)

        out = torch.cat(generated, dim=1) if generated else prime.new_empty(b, 0)
        return out.squeeze(0) if num_dims == 1 else out

    def forward(
        self,
        x: Tensor | Sequence[Tensor],
        max_batch_size: int | None = None,
        return_loss: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Without return_loss: the net's output for x (one segment), a plain tuple.

        With return_loss: an iterator of Return(loss, aux_loss, is_last_batch), one per
        segment of seq_len input tokens and micro-batch of max_batch_size rows, in upstream's
        order (segment-major); memories are carried per micro-batch. x is (b, n) tokens, the
        targets are x shifted by one; a mask of width n is trimmed to n - 1. x may be a list
        of 1-D tensors of different lengths: inputs are padded with pad_value, targets with
        ignore_index, and a mask is built from the lengths unless one is given.
        """
        if not return_loss:
            if not isinstance(x, Tensor):
                x, lengths = _pad_list(x, self.pad_value)
                if kwargs.get("mask") is None:
                    kwargs["mask"] = _lengths_mask(lengths, x.shape[1])
            return self.net(x, **kwargs)

        inputs, targets, mask = self._lm_batch(x, kwargs.pop("mask", None))
        batch = inputs.shape[0]
        if max_batch_size is None:
            max_batch_size = batch
        if (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, int)
            or max_batch_size < 1
        ):
            raise ValueError(
                f"max_batch_size must be a positive int or None, got {max_batch_size!r}"
            )
        return self._segment_losses(inputs, targets, mask, max_batch_size, kwargs)

    def _lm_batch(self, x: Any, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Inputs, shifted targets and the matching mask, as (b, n - 1) tensors."""
        if isinstance(x, Tensor):
            if x.ndim != 2 or x.shape[1] < 2:
                raise ValueError(f"x must have shape (batch, n >= 2), got {tuple(x.shape)}")
            full_len = x.shape[1]
            inputs, targets = x[:, :-1], x[:, 1:]
        else:
            seqs = list(x)
            if any(isinstance(s, Tensor) and len(s) < 2 for s in seqs):
                raise ValueError("every sequence in x must hold at least 2 tokens")
            inputs, lengths = _pad_list([s[:-1] for s in seqs], self.pad_value)
            targets, _ = _pad_list([s[1:] for s in seqs], self.ignore_index)
            full_len = inputs.shape[1] + 1
            if mask is None:
                mask = _lengths_mask(lengths, inputs.shape[1])
        # A mask as wide as x (not x[:, :-1]) is resolved for the user, as upstream.
        if mask is not None and mask.shape[1] == full_len:
            mask = mask[:, :-1]
        return inputs, targets, mask

    def _segment_losses(
        self, inputs: Tensor, targets: Tensor, mask: Tensor | None, max_batch_size: int,
        kwargs: dict[str, Any],
    ) -> Iterator[Return]:
        def split_segments(t: Tensor) -> tuple[Tensor, ...]:
            return t.split(self.seq_len, dim=1)

        def split_batch(t: Tensor) -> tuple[Tensor, ...]:
            return t.split(max_batch_size, dim=0)

        input_segments, target_segments = split_segments(inputs), split_segments(targets)
        n_segments = len(input_segments)
        mask_segments = split_segments(mask) if mask is not None else (None,) * n_segments
        n_micro = math.ceil(inputs.shape[0] / max_batch_size)

        memories = [None] * n_micro
        segments = zip(input_segments, target_segments, mask_segments)
        for seg_inputs, seg_targets, seg_mask in segments:
            micro_masks = split_batch(seg_mask) if seg_mask is not None else (None,) * n_micro
            next_memories = []
            for ind, (xi, xo, mi, mem) in enumerate(
                zip(split_batch(seg_inputs), split_batch(seg_targets), micro_masks, memories)
            ):
                hidden, new_mem, aux_loss = self.net.features(
                    xi, mask=mi, memories=mem, memory_gradients=self.memory_gradients, **kwargs
                )
                next_memories.append(new_mem)
                # Every target ignored (padding of shorter list inputs) gives 0 with a graph,
                # where cross_entropy's empty mean would give NaN.
                loss = self.net.lm_loss(hidden, xo, self.ignore_index)
                yield Return(loss, aux_loss, ind == n_micro - 1)
            memories = next_memories
