"""Evaluation split over the processes of ``accelerate launch`` (or ``torchrun``).

The work items (prompts, perplexity windows) are cut into the batches a single process would run, in the same
order; batch ``k`` goes to process ``k % num_processes``. Every batch is therefore exactly one of the
single-process run's batches (same members, same padding), so greedy generations and per-window losses do not
depend on the number of processes. The results are gathered back in item order with accelerate's
``gather_object`` and every process ends with the whole result; only the main process writes files.

A failure on one process fails all of them at once (:func:`run_everywhere`) rather than leaving the others waiting.

Started as one plain process (no ``WORLD_SIZE`` > 1 in the environment) nothing is imported from accelerate and
every function here is the single-process case.
"""

from __future__ import annotations

import os


def launched_processes() -> int:
    """The process count a launcher (``accelerate launch``, ``torchrun``) put in the environment; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state():
    """accelerate's ``PartialState`` under a multi-process launch (created on first use), else ``None``."""
    if launched_processes() <= 1:
        return None
    import torch

    try:
        from accelerate import PartialState
    except ImportError as err:
        raise RuntimeError(f"started by a launcher with WORLD_SIZE={launched_processes()}, but accelerate is not "
                           "installed; pip install 'ppa_hf[train]' or run a single process") from err
    # a launch on a machine without GPUs (e.g. examples/accelerate_configs/cpu_2proc.yaml): gloo over CPU
    # processes, as the fine-tune does
    return PartialState(cpu=not torch.cuda.is_available())


def num_processes() -> int:
    state = process_state()
    return 1 if state is None else state.num_processes


def process_index() -> int:
    state = process_state()
    return 0 if state is None else state.process_index


def is_main_process() -> bool:
    return process_index() == 0


def process_device():
    """The device of this process under a multi-process launch (``cuda:<local rank>`` or ``cpu``), else ``None``."""
    state = process_state()
    return None if state is None else state.device


def wait_for_everyone() -> None:
    state = process_state()
    if state is not None:
        state.wait_for_everyone()


def batches(order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of ``batch_size`` (the last one may be shorter)."""
    return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]


def my_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """The batches of ``order`` this process runs: every ``num_processes``-th, starting at its index."""
    return batches(order, batch_size)[process_index()::num_processes()]


def items_per_process(count: int, batch_size: int) -> list[int]:
    """How many of ``count`` items each process runs (the same on every process: no communication)."""
    sizes = [len(b) for b in batches(list(range(count)), batch_size)]
    n = num_processes()
    return [sum(sizes[rank::n]) for rank in range(n)]


def run_everywhere(work):
    """``work()`` on this process. Under a launch a failure anywhere fails every process: each process reports
    whether its ``work`` raised (one ``gather_object``, which is also a barrier), the one that failed re-raises its
    own exception and the others raise a ``RuntimeError`` naming it, instead of waiting in the next collective
    until the backend's timeout (tens of minutes)."""
    if process_state() is None:
        return work()
    from accelerate.utils import gather_object

    try:
        result, failure = work(), None
    except Exception as err:  # noqa: BLE001 - reported to the other processes, then re-raised below
        result, failure = err, f"process {process_index()}: {type(err).__name__}: {err}"
    failures = [f for f in gather_object([failure]) if f is not None]
    if failure is not None:
        raise result
    if failures:
        raise RuntimeError("stopped because another process failed: " + "; ".join(failures))
    return result


def gather_in_order(pairs: list[tuple[int, object]], count: int) -> list:
    """Every process's ``(index, value)`` pairs, gathered to every process, as a list of ``count`` values in
    index order. A missing or repeated index is an error (it would mean a problem run twice or never)."""
    if process_state() is not None:
        from accelerate.utils import gather_object

        pairs = gather_object(list(pairs))
    values = dict(pairs)
    if len(values) != len(pairs) or sorted(values) != list(range(count)):
        raise RuntimeError(f"gathered {len(pairs)} results for indices {sorted(values)[:10]}..., expected each of "
                           f"0..{count - 1} once")
    return [values[i] for i in range(count)]


def from_main(value):
    """The main process's ``value``, on every process (other processes may pass ``None``)."""
    if process_state() is None:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
