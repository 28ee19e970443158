"""The torch side of a benchmark: ct_torch_ref (or upstream 0.4.0) through AutoregressiveWrapper.

Every call returns only once its work is done (on CUDA: `torch.cuda.synchronize`), so the
caller's clock reads bracket exactly one unit of work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import ct_torch_ref
from ct_jax.bench.common import BenchConfig, batch_primes, interleaved, tokens_for


def upstream_available() -> bool:
    """Whether the upstream package (compressive_transformer_pytorch) is installed."""
    try:
        import compressive_transformer_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class TorchSide:
    """ct_torch_ref (or the upstream package) through AutoregressiveWrapper, with Adam."""

    def __init__(self, bench: BenchConfig, device: str, threads: int, *, upstream: bool = False,
                 state_dict: dict[str, Any] | None = None):
        if upstream:  # optional package: imported only when asked for
            import compressive_transformer_pytorch as lib
        else:
            lib = ct_torch_ref
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.bench = bench
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = lib.CompressiveTransformer(**bench.model)
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.to(self.device).train()
        self.wrapper = lib.AutoregressiveWrapper(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        tokens = tokens_for(bench)
        self.tokens = torch.from_numpy(tokens).to(self.device)
        self.prime = torch.from_numpy(np.ascontiguousarray(tokens[:1, : bench.prime])).to(self.device)
        # bfloat16: autocast on the forward (parameters and optimizer stay float32)
        self._autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=bench.dtype == "bfloat16")

    def state_dict(self) -> dict[str, Any]:
        """A CPU copy of the model's weights (for the JAX side and upstream)."""
        return {key: value.detach().cpu().clone() for key, value in self.model.state_dict().items()}

    def sync(self) -> None:
        """Waits for queued CUDA work (nothing on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> None:
        """One training step: a backward per segment, clipping, an Adam update."""
        segments = self.wrapper(self.tokens, return_loss=True)
        while True:
            with torch.autocast(**self._autocast):
                out = next(segments, None)  # forward of the next segment
            if out is None:
                break
            (out.loss + out.aux_loss).sum().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()

    def eval_step(self) -> None:
        """Every segment in eval mode, without gradients."""
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(**self._autocast):
                for _ in self.wrapper(self.tokens, return_loss=True):
                    pass
        finally:
            self.model.train()
        self.sync()

    def generate(self, batch: int = 1) -> None:
        """Samples `bench.generate` tokens after the prime (`batch` rows of it: `batch_primes`)."""
        prime = self.prime
        if batch != 1:
            prime = torch.from_numpy(batch_primes(self.bench, batch)).to(self.prime.device)
        torch.manual_seed(0)
        with torch.autocast(**self._autocast):
            self.wrapper.generate(prime, self.bench.generate)
        self.sync()

    def device_peak_mib(self) -> float | None:
        """Peak CUDA memory allocated, MiB (None on CPU)."""
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None


def torch_matmul_seconds(n: int, dtype: str, device: str, reps: int, threads: int) -> float:
    """Median seconds of one (n, n) @ (n, n) product in torch."""
    torch.set_num_threads(threads)
    target = torch.device("cuda" if device == "gpu" else "cpu")
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(target, getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    return interleaved(dict(torch=lambda: a @ b), reps, sync=sync, settle_s=0)["torch"].median
