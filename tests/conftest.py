"""Shared fixtures: the real CLI in a subprocess, the tiny real-MNIST spec, a local Ray instance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_SPEC = ROOT / "tests" / "specs" / "tiny_mnist.toml"
ALLOCLAB = Path(sys.executable).parent / "alloclab"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the installed `alloclab` console script in a subprocess."""
    return subprocess.run([str(ALLOCLAB), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


@pytest.fixture
def alloclab(tmp_path: Path):
    def call(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=tmp_path, timeout=timeout)
    return call


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the tests that exercise Ray itself (each start costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
