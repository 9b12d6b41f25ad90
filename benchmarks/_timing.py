"""Timing shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

import statistics
import time


def median_of_rounds(calls: dict, rounds: int = 15, batch: int = 20) -> dict:
    """Seconds per call of each of `calls` (name -> callable): rounds of `batch` calls of every
    peer in turn (interleaved, so a slow phase of a shared machine hits all), medians of rounds."""
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(batch):
                call()
            samples[name].append((time.perf_counter() - start) / batch)
    return {name: statistics.median(values) for name, values in samples.items()}
