"""alloclab's engine: spec -> plan -> executor -> backend -> store -> analysis -> report.

The public API is small: load a spec, plan it, run it against a store, read the results.
"""

from engine.errors import BackendError, DataError, SpecError, StoreError
from engine.executor import RayExecutor, SerialExecutor, make_executor
from engine.pipeline import Pipeline, RunSummary
from engine.plan import Plan, make_plan
from engine.spec import Spec, load_spec
from engine.store import Store, open_store

__all__ = [
    "BackendError", "DataError", "SpecError", "StoreError",
    "Pipeline", "RunSummary", "Plan", "make_plan", "Spec", "load_spec", "Store", "open_store",
    "RayExecutor", "SerialExecutor", "make_executor",
]
