"""Benchmark runs `jobs` at a time in worker processes, each pinned to its own cores."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def _core_sets(jobs: int) -> list[set[int]]:
    """This process's cores dealt round-robin into `jobs` disjoint sets (shared when there are fewer cores)."""
    cores = sorted(os.sched_getaffinity(0))
    return [set(cores[i::jobs]) or {cores[i % len(cores)]} for i in range(jobs)]


def _pin(cores: Any) -> None:
    """Worker initializer: keep to one set of cores, so that XLA sizes its thread pool to it (runs
    before the worker's first computation, when JAX creates its CPU client)."""
    os.sched_setaffinity(0, cores.get())


def run_all(function: Callable[..., Any], calls: Sequence[tuple[Any, ...]], jobs: int = 1) -> Iterator[Any]:
    """`function(*call)` for every call, `jobs` at a time in spawned, pinned workers (1: in this
    process, in order); results are yielded as they finish."""
    if jobs == 1:
        for call in calls:
            yield function(*call)
        return
    context = multiprocessing.get_context("spawn")  # JAX does not survive fork
    cores = context.Queue()
    for core in _core_sets(jobs):
        cores.put(core)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_pin,
                                                initargs=(cores,)) as pool:
        futures = [pool.submit(function, *call) for call in calls]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
