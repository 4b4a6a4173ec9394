"""engine.flow.Flow: one queue of tasks by priority, at most ``slots`` in flight, handlers that queue more."""

from __future__ import annotations

import pytest

from engine.executor import SerialExecutor
from engine.flow import Flow


def square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


def test_a_freed_slot_goes_to_the_highest_priority_task_queued_by_then() -> None:
    """Two slots: A and B start; A's handler queues D (priority 1), which then starts before C (priority 2,
    queued first); ties keep the order tasks were added. Each handler gets its own result."""
    flow = Flow(SerialExecutor(), slots=2)
    results: dict[str, int] = {}

    def done(key: str, res: int, err: BaseException | None) -> None:
        assert err is None
        results[key] = res
        if key == "a":
            flow.add("d", 1, square, [("d", (4,))], done)

    flow.add("a", 0, square, [("a", (1,))], done)
    flow.add("b", 2, square, [("b", (2,)), ("c", (3,))], done)
    flow.run()
    assert [key for _, key in flow.started] == ["a", "b", "d", "c"]
    assert results == {"a": 1, "b": 4, "c": 9, "d": 16}
    assert flow.seconds("b") >= 0 and flow.seconds("nothing") == 0


def test_one_slot_runs_by_priority_and_a_failing_task_is_reported_not_raised() -> None:
    flow = Flow(SerialExecutor(), slots=1)
    seen: list[tuple[str, int | None, str | None]] = []

    def done(key: str, res: int | None, err: BaseException | None) -> None:
        seen.append((key, res, None if err is None else str(err)))

    flow.add("late", 5, square, [("late", (3,))], done)
    flow.add("bad", 0, square, [("bad", (-1,))], done)
    flow.add("early", 1, square, [("early", (2,))], done)
    flow.run()
    assert seen == [("bad", None, "negative: -1"), ("early", 4, None), ("late", 9, None)]


def test_a_handler_that_raises_stops_the_flow_and_leaves_nothing_in_flight() -> None:
    flow = Flow(SerialExecutor(), slots=3)

    def done(key: str, res: int, err: BaseException | None) -> None:
        raise RuntimeError(f"store full at {key}")

    flow.add("x", 0, square, [(str(i), (i,)) for i in range(5)], done)
    with pytest.raises(RuntimeError, match="store full at 0"):
        flow.run()
    assert flow._in_flight == {} and [k for _, k in flow.started] == ["0", "1", "2"]


class Recording:
    """An executor that records submits and handler runs in one log; tasks run when waited for (in order)."""

    threads_per_task = None

    def __init__(self, log: list[str]) -> None:
        self.log, self.inner = log, SerialExecutor()

    def submit(self, fn, args, *, gpus=0, cpus=1):  # type: ignore[no-untyped-def]
        self.log.append(f"submit {args[0]}")
        return self.inner.submit(fn, args, gpus=gpus, cpus=cpus)

    def wait(self, handles):  # type: ignore[no-untyped-def]
        return self.inner.wait(handles)

    def cancel(self, handles):  # type: ignore[no-untyped-def]
        pass


def test_a_later_handler_runs_once_its_freed_slot_is_refilled() -> None:
    """One slot. A's handler is ``later``: B is submitted before it runs (a slow store write then overlaps with B's
    compute); the handler still runs before B's result is taken, and may queue more (D, which then takes B's slot
    before C, and before B's own later handler runs). Without ``later`` (D, C), a handler runs before the next
    submit, as a pre-training seed's must."""
    log: list[str] = []
    flow = Flow(Recording(log), slots=1)

    def done(key: str, res: int, err: BaseException | None) -> None:
        log.append(f"handle {key}")
        if key == "1":
            flow.add("d", 2, square, [("4", (4,))], done)

    flow.add("a", 0, square, [("1", (1,))], done, later=True)
    flow.add("b", 1, square, [("2", (2,))], done, later=True)
    flow.add("c", 3, square, [("3", (3,))], done)
    flow.run()
    assert log == ["submit 1", "submit 2", "handle 1", "submit 4", "handle 2", "handle 4", "submit 3", "handle 3"]


def test_later_handlers_still_run_when_nothing_is_left_to_submit() -> None:
    flow = Flow(SerialExecutor(), slots=2)
    seen: list[str] = []
    flow.add("x", 0, square, [(str(i), (i,)) for i in range(3)], lambda k, r, e: seen.append(k), later=True)
    flow.run()
    assert sorted(seen) == ["0", "1", "2"] and flow._done == []
