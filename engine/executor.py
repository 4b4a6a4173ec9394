"""Executors run worker functions and hand their results back to the driver in completion order.

``RayExecutor`` (the default) starts a local Ray instance with explicit ``num_cpus`` and no dashboard, or joins a
cluster with ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets). ``SerialExecutor`` runs in-process
(tests and debugging: ``alloclab run --serial``). Both implement :class:`Executor`: ``put`` a shared value once,
``submit`` one task and ``wait`` for the first of several to finish (the driver's scheduler,
:class:`engine.flow.Flow`, uses these two); :func:`run_all` runs a function over jobs with them and iterates
``(key, result, error)`` as each finishes. A job that raises yields its exception; the run goes on. A result with a
``node_id`` field gets the id of the node that computed it (Ray's node id, or :data:`LOCAL_NODE` in-process), which
the driver stores with the stage or trial.

To add an executor (e.g. a batch scheduler): implement the methods of :class:`Executor` and add it to
:func:`make_executor`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Iterator, Protocol

from engine.errors import BackendError

LOCAL_NODE = "local"  # node id recorded by the in-process executor
# Ray re-runs a task whose worker process or node died (not one that raised) this many times: a lost cluster node
# costs the tasks it was running, not failed trials. Lost task results are rebuilt the same way (lineage).
SYSTEM_RETRIES = 3


def with_node(result: Any, node_id: str) -> Any:
    """``result`` with its ``node_id`` field set (a frozen dataclass: a shallow copy); other values unchanged."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type) and any(
            f.name == "node_id" for f in dataclasses.fields(result)):
        return dataclasses.replace(result, node_id=node_id)
    return result


def _on_ray_node(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` stamping its result with the id of the Ray node it ran on (keeps fn's name for Ray's task names)."""

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        import ray

        return with_node(fn(*args), ray.get_runtime_context().get_node_id())

    return call


class Executor(Protocol):
    threads_per_task: int | None

    def put(self, value: Any) -> Any: ...

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], *, gpus: float = 0, cpus: float = 1) -> Any:
        """Start ``fn(*args)`` holding ``cpus`` CPUs and ``gpus`` GPUs while it runs; returns a hashable handle."""
        ...

    def wait(self, handles: list[Any]) -> tuple[Any, Any, BaseException | None]:
        """Block until one of ``handles`` is finished: (its handle, its result or None, its exception or None)."""
        ...

    def cancel(self, handles: list[Any]) -> None:
        """Stop tasks not yet finished (an interrupted run leaves none running)."""
        ...

    def slots(self) -> int:
        """How many one-CPU tasks run at once (the CPUs of the local instance or of the whole cluster)."""
        ...

    def gpus(self) -> int:
        """GPUs the tasks can use (0 = none)."""
        ...

    def shutdown(self) -> None: ...


def run_all(ex: Executor, fn: Callable[..., Any], jobs: list[tuple[str, tuple[Any, ...]]], *, gpus: float = 0,
            cpus: float = 1) -> Iterator[tuple[str, Any, BaseException | None]]:
    """Every job submitted at once, ``(key, result, error)`` in completion order; tasks left when the consumer stops
    early (an exception, an interrupt) are cancelled."""
    pending = {ex.submit(fn, args, gpus=gpus, cpus=cpus): key for key, args in jobs}
    try:
        while pending:
            handle, result, error = ex.wait(list(pending))
            yield pending.pop(handle), result, error
    finally:
        ex.cancel(list(pending))


class _Deferred:
    """A task of the in-process executor: it runs when waited for."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args


class SerialExecutor:
    """Runs each job in this process, in order. Exceptions are returned, not raised."""

    threads_per_task: int | None = None

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], *, gpus: float = 0, cpus: float = 1) -> Any:
        return _Deferred(fn, args)

    def wait(self, handles: list[Any]) -> tuple[Any, Any, BaseException | None]:
        """Runs the first of ``handles`` (tasks run in the order they were submitted) and returns it."""
        task = handles[0]
        try:
            return task, with_node(task.fn(*task.args), LOCAL_NODE), None
        except Exception as e:  # noqa: BLE001 - a failing job is data, the run goes on
            return task, None, e

    def cancel(self, handles: list[Any]) -> None:
        pass  # nothing runs until it is waited for

    def slots(self) -> int:
        return 1

    def gpus(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """Ray tasks (one CPU and one torch thread each, unless ``run`` asks otherwise), consumed with ``ray.wait`` in
    completion order.

    Every task asks for one CPU, also on a cluster, so a node runs as many at once as it has CPUs (``ray start
    --num-cpus``); a task given ``gpus`` also holds that many GPUs (Ray sets its CUDA_VISIBLE_DEVICES). A task whose
    worker or node dies is re-run by Ray (:data:`SYSTEM_RETRIES`); one that raises is not.
    """

    threads_per_task: int | None = 1

    def __init__(self, num_cpus: int | None = None, address: str | None = None) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token warning on every local start
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        try:
            import ray
        except ImportError as e:
            raise BackendError("the Ray executor needs ray: pip install -e .") from e
        self._ray = ray
        self._remote: dict[Callable[..., Any], Any] = {}
        self._num_cpus = num_cpus
        self._address = address

    def _ensure_started(self) -> None:
        """Start or join Ray on first use, so a run with nothing to do never pays for it."""
        ray, address, num_cpus = self._ray, self._address, self._num_cpus
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                  "configure_logging": True, "log_to_driver": False}
        address = address or os.environ.get("RAY_ADDRESS") or None  # `ray job submit` sets RAY_ADDRESS
        if address:
            kwargs["address"] = address
        else:  # "local": always a new instance, never the machine's latest `ray start` cluster
            kwargs.update(address="local", num_cpus=num_cpus or os.cpu_count() or 1)
        if not ray.is_initialized():
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise BackendError(f"cannot start or join {where}: {e}; fix: check --address / `ray status`") from e

    def put(self, value: Any) -> Any:
        self._ensure_started()
        return self._ray.put(value)

    def _remote_fn(self, fn: Callable[..., Any]) -> Any:
        if fn not in self._remote:  # define each remote function once (Ray anti-pattern otherwise)
            self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=SYSTEM_RETRIES)(_on_ray_node(fn))
        return self._remote[fn]

    def _resources(self) -> dict[str, float]:
        self._ensure_started()
        return self._ray.cluster_resources()

    def slots(self) -> int:
        return max(1, int(self._resources().get("CPU", 1)))

    def gpus(self) -> int:
        return int(self._resources().get("GPU", 0))

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], *, gpus: float = 0, cpus: float = 1) -> Any:
        self._ensure_started()
        remote = self._remote_fn(fn)
        if gpus or cpus != 1:
            remote = remote.options(num_gpus=gpus, num_cpus=cpus)
        return remote.remote(*args)

    def wait(self, handles: list[Any]) -> tuple[Any, Any, BaseException | None]:
        (ref,), _ = self._ray.wait(handles, num_returns=1)
        try:
            return ref, self._ray.get(ref), None
        except Exception as e:  # noqa: BLE001 - RayTaskError, worker crash: recorded as failed
            return ref, None, getattr(e, "cause", None) or e

    def cancel(self, handles: list[Any]) -> None:
        for ref in handles:  # interrupted: do not leave tasks running
            self._ray.cancel(ref, force=True)

    def shutdown(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


def make_executor(kind: str = "ray", num_cpus: int | None = None, address: str | None = None) -> Executor:
    if kind == "serial":
        return SerialExecutor()
    if kind == "ray":
        return RayExecutor(num_cpus=num_cpus, address=address)
    raise ValueError(f"unknown executor '{kind}'; known executors are: ray, serial")
