"""Executors run worker functions and hand their results back to the driver in completion order.

``RayExecutor`` (the default) starts a local Ray instance with explicit ``num_cpus`` and no dashboard, or joins a
cluster with ``address``. ``SerialExecutor`` runs in-process (tests and debugging: ``alloclab run --serial``).
Both implement :class:`Executor`: ``put`` a shared value once, ``run`` a function over jobs and iterate
``(key, result, error)`` as each finishes. A job that raises yields its exception; the run goes on.

To add an executor (e.g. a batch scheduler): implement the three methods and add it to :func:`make_executor`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Protocol

from engine.errors import BackendError


class Executor(Protocol):
    threads_per_task: int | None

    def put(self, value: Any) -> Any: ...

    def run(self, fn: Callable[..., Any], jobs: list[tuple[str, tuple[Any, ...]]]) -> Iterator[
        tuple[str, Any, BaseException | None]]: ...

    def shutdown(self) -> None: ...


class SerialExecutor:
    """Runs each job in this process, in order. Exceptions are returned, not raised."""

    threads_per_task: int | None = None

    def put(self, value: Any) -> Any:
        return value

    def run(self, fn: Callable[..., Any], jobs: list[tuple[str, tuple[Any, ...]]]) -> Iterator[
            tuple[str, Any, BaseException | None]]:
        for key, args in jobs:
            try:
                yield key, fn(*args), None
            except Exception as e:  # noqa: BLE001 - a failing job is data, the run goes on
                yield key, None, e

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """Ray tasks (one CPU and one torch thread each), consumed with ``ray.wait`` in completion order."""

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
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
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
            self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=0)(fn)
        return self._remote[fn]

    def run(self, fn: Callable[..., Any], jobs: list[tuple[str, tuple[Any, ...]]]) -> Iterator[
            tuple[str, Any, BaseException | None]]:
        self._ensure_started()
        remote = self._remote_fn(fn)
        pending = {remote.remote(*args): key for key, args in jobs}
        try:
            while pending:
                done, _ = self._ray.wait(list(pending), num_returns=1)
                for ref in done:
                    key = pending.pop(ref)
                    try:
                        yield key, self._ray.get(ref), None
                    except Exception as e:  # noqa: BLE001 - RayTaskError, worker crash: recorded as failed
                        yield key, None, getattr(e, "cause", None) or e
        finally:
            for ref in pending:  # interrupted: do not leave tasks running
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
