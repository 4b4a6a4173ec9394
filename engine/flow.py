"""The driver's scheduler: tasks of every stage in one queue, by priority, never more in flight than CPUs.

A run is a small graph: each pre-training seed's checkpoint unlocks its embeddings, the trial checkpoint's embeddings
unlock the allocation trials, and each seed's test embeddings unlock its separation jobs. Stage by stage (all
pre-training, then all embeddings, ...) leaves CPUs idle whenever a stage has fewer tasks left than there are CPUs,
and the trials, the longest part, wait for the slowest seed. :class:`Flow` instead keeps one queue: a finished
task's handler may add the tasks it unlocks, and whenever a task ends the highest-priority queued task takes its
place. The driver, not Ray, decides the order, because Ray runs queued tasks in no order we can set.

Priorities (lower first; :data:`PRIORITY`): pre-training first, the trial checkpoint's seed before the others, then
the trial checkpoint's embeddings, the other seeds' test embeddings, the trials, and the separation jobs last.
Pre-training seeds are long tasks that cannot be split: started last, one runs alone at the end while the other CPUs
idle. The trials and separation jobs are many short tasks that fill whatever CPUs are free, so they go last. (The
previous order put the trial checkpoint's embeddings before the other seeds' pre-training, to start the trials
early. Where the embeddings are long, as MiniLM's on the RedditBias sweep (79 s, against 16 s of trials), and a
seed ends early, that can leave the last seed's pre-training and embeddings running alone at the end. On
undisturbed runs of the demo and of that sweep, both orders took the same time.)

At most :meth:`Executor.slots` tasks are in flight, one CPU each, so Ray starts each at once and no CPU is shared
by two tasks (sharing cost the demo's pre-training about a third of its speed, measured: 2.4 s per epoch instead of
1.4). Results are handled in completion order, in the driver, which alone writes the store.

A task added with ``later=True`` has its handler run only after its freed slot has been handed to the next queued
task: its writes (an embedding split is 300 MB, 2.5 s to commit) then overlap with a worker's compute instead of
leaving that CPU idle. That is right for handlers that queue nothing more urgent than what can already be queued:
an embedding's handler queues trials and separation jobs, a trial's or a separation job's nothing. A pre-training
seed's handler queues that seed's embeddings, which must not wait behind queued trials or separation jobs, so it
runs at once (its writes are a checkpoint file and one row).
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.executor import Executor

PRIORITY = {"pretrain_trial_seed": 0, "pretrain": 1, "embed_trial_seed": 2, "embed": 3, "trials": 4,
            "separation": 5}

Handler = Callable[[str, Any, BaseException | None], None]


@dataclass(order=True)
class _Task:
    priority: int
    seq: int  # ties: the order tasks were added
    kind: str = field(compare=False)
    key: str = field(compare=False)
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)
    on_done: Handler = field(compare=False)
    gpus: float = field(compare=False, default=0)
    later: bool = field(compare=False, default=False)


class Flow:
    """Queued tasks, run by priority with at most ``slots`` in flight.

    Args:
        ex: The executor that runs the tasks.
        slots: Tasks in flight at most (default: the executor's CPUs, :meth:`Executor.slots`, asked only once a
            task is queued: a run with nothing to do never starts Ray).
    """

    def __init__(self, ex: Executor, slots: int | None = None) -> None:
        self.ex = ex
        self.slots = slots
        self._queue: list[_Task] = []
        self._seq = itertools.count()
        self._in_flight: dict[Any, _Task] = {}
        self._done: list[tuple[_Task, Any, BaseException | None]] = []  # ended, handler not run yet (``later``)
        self.started: list[tuple[str, str]] = []  # (kind, key) in the order tasks were handed to the executor
        self.spans: dict[str, list[float]] = {}  # kind -> [first start, last end] (perf_counter seconds)

    def add(self, kind: str, priority: int, fn: Callable[..., Any], jobs: list[tuple[str, tuple[Any, ...]]],
            on_done: Handler, *, gpus: float = 0, later: bool = False) -> None:
        """Queue ``fn(*args)`` for each (key, args); ``on_done(key, result, error)`` runs in the driver when it
        ends (it may add tasks); with ``later``, once the freed slot has been refilled (see the module's doc)."""
        for key, args in jobs:
            heapq.heappush(self._queue, _Task(priority, next(self._seq), kind, key, fn, args, on_done, gpus, later))

    def run(self) -> None:
        """Until nothing is queued or in flight. A handler's exception stops the flow; what is in flight then is
        cancelled (as on an interrupt), so a failed or interrupted run leaves no task running."""
        if self._queue and self.slots is None:
            self.slots = self.ex.slots()
        slots = max(1, self.slots or 1)
        try:
            while self._queue or self._in_flight or self._done:
                while self._queue and len(self._in_flight) < slots:
                    task = heapq.heappop(self._queue)
                    handle = self.ex.submit(task.fn, task.args, gpus=task.gpus)
                    self._in_flight[handle] = task
                    self.started.append((task.kind, task.key))
                    self.spans.setdefault(task.kind, [time.perf_counter(), 0.0])
                if self._done:  # slots are full (or nothing is queued): now the deferred handlers, oldest first
                    task, result, error = self._done.pop(0)
                    task.on_done(task.key, result, error)
                    continue
                handle, result, error = self.ex.wait(list(self._in_flight))
                task = self._in_flight.pop(handle)
                self.spans[task.kind][1] = time.perf_counter()
                if task.later:
                    self._done.append((task, result, error))
                else:
                    task.on_done(task.key, result, error)
        finally:
            self._done.clear()
            if self._in_flight:
                self.ex.cancel(list(self._in_flight))
                self._in_flight.clear()

    def seconds(self, kind: str) -> float:
        """Wall seconds from the first task of ``kind`` starting to the last ending (0 when none ran). Kinds
        overlap, so these add up to more than the run."""
        first, last = self.spans.get(kind, (0.0, 0.0))
        return max(last - first, 0.0)
