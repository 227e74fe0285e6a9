"""Shared by the side-by-side benchmarks (bench_ih.py, bench_lm.py): single-threaded torch,
library output on stderr, and a clock that stands in for tqdm in spd.run_spd.optimize.

The optimize loop's tqdm is replaced by an iterator that stamps the time at which each step
begins, so one step = everything the loop does between two stamps (data batch, target forward
with cache, CI fns, all loss terms, backward, per-layer L0, AdamW step). The first WARMUP steps
are skipped, then STEPS steps are timed; the run is given STEPS + WARMUP steps so the final
"plot + save" step (no optimizer step, writes a checkpoint) is never timed.
"""

import json
import os
import resource
import sys
import time

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BIG = 10**9


def stdout_to_stderr() -> int:
    """Sends everything the library prints (logger, tqdm.write, warnings) to stderr; returns a
    descriptor of the original stdout for the one JSON result line."""
    result_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return result_fd


def single_threaded_torch():
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


class StepClock:
    """Stands in for tqdm in spd.run_spd.optimize: records when each step begins."""

    stamps: list[float] = []
    cpu: list[tuple[float, float]] = []  # (user, sys) CPU seconds of this process

    @staticmethod
    def stamp():
        r = resource.getrusage(resource.RUSAGE_SELF)
        StepClock.cpu.append((r.ru_utime, r.ru_stime))
        StepClock.stamps.append(time.perf_counter())

    def __init__(self, iterable, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        for item in self.iterable:
            StepClock.stamp()
            yield item
        StepClock.stamp()

    @staticmethod
    def write(s, *args, **kwargs):
        print(s, file=sys.stderr)


def install_clock() -> None:
    import spd.run_spd as run_spd

    run_spd.tqdm = StepClock


def timing(steps: int, warmup: int) -> dict:
    """Steps/s and per-step figures of the timed window (after `install_clock` and a run of
    steps + warmup steps)."""
    import torch

    stamps = StepClock.stamps
    total_steps = steps + warmup
    # The loop runs steps 0..total_steps (total_steps + 1 iterations): total_steps + 2 stamps.
    assert len(stamps) == total_steps + 2, f"expected {total_steps + 2} step stamps, got {len(stamps)}"
    durations = [
        b - a for a, b in zip(stamps[warmup : warmup + steps], stamps[warmup + 1 : warmup + steps + 1])
    ]
    elapsed = stamps[warmup + steps] - stamps[warmup]
    cpu0, cpu1 = StepClock.cpu[warmup], StepClock.cpu[warmup + steps]
    return {
        "impl": "reference (goodfire-ai/spd)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": steps,
        "warmup_steps_skipped": warmup,
        "steps_per_second": steps / elapsed,
        "seconds_per_step": elapsed / steps,
        "min_seconds_per_step": min(durations),
        "max_seconds_per_step": max(durations),
        # CPU time of this process per timed step; wall well above user + sys means the
        # machine was busy (the timing is then pessimistic).
        "cpu_user_seconds_per_step": (cpu1[0] - cpu0[0]) / steps,
        "cpu_sys_seconds_per_step": (cpu1[1] - cpu0[1]) / steps,
    }


def emit(result_fd: int, result: dict) -> None:
    os.write(result_fd, (json.dumps(result) + "\n").encode())
