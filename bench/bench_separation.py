"""Time the vectorised ``tv_paper`` against the paper-style per-dimension ``np.histogram`` loop, in the same run.

Section "single": seeded synthetic float32 embeddings, 50,000 x 1,024, two classes and two groups with a small shift.
Prints seconds, the speed ratio (baseline / ours) and the largest absolute difference of the two results (per class
and the attribute value), then the permutation null with R replicates against R x one estimate.

Section "replicates": ``estimate(..., permutations=200, bootstrap=100)`` at the demo scale (4,000 x 1,568 float32,
the same ReLU-like generator) for ``tv_paper`` and ``tv``, with the per-replicate loop (one Stat call per replicate
and class: the reference, ``engine.separation._BATCHED = False``) and with the batched path (``Stat.many``), in the
same run. Prints both times, their ratio and whether every output field is identical (it must be: exit 1 if not).

    .venv/bin/python bench/bench_separation.py                      # both sections (under two minutes)
    .venv/bin/python bench/bench_separation.py --only replicates    # about 80 s, most of it the reference loop
    .venv/bin/python bench/bench_separation.py --only single --n 5000 --d 256 --perms 20
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.separation as separation  # noqa: E402
from engine.separation import estimate  # noqa: E402


def paper_tvd(x: np.ndarray, y: np.ndarray, bins: int = 50) -> float:
    """compute_tvd as the paper's code does it (method.md §4): a loop over dimensions, density histograms."""
    tvds = []
    for d in range(x.shape[1]):
        hist_x, edges = np.histogram(x[:, d], bins=bins, density=True)
        hist_y, _ = np.histogram(y[:, d], bins=edges, density=True)
        hist_x = hist_x / np.sum(hist_x)
        hist_y = hist_y / np.sum(hist_y)
        tvds.append(0.5 * np.sum(np.abs(hist_x - hist_y)))
    return float(np.mean(tvds))


def paper_attribute_tv(z: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict[str, float]:
    per_class = [paper_tvd(z[(y == c) & (g == 0)], z[(y == c) & (g == 1)]) for c in (0, 1)]
    return {"value": float(np.average(per_class, weights=[1, 1])), "value_y0": per_class[0], "value_y1": per_class[1]}


def synthetic(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, g = rng.integers(0, 2, n), rng.integers(0, 2, n)
    z = rng.standard_normal((n, d), dtype=np.float32)
    z += (0.5 * y)[:, None].astype(np.float32)
    z[:, : d // 8] += (0.1 * g)[:, None].astype(np.float32)  # a small group shift in an eighth of the dimensions
    np.maximum(z[:, d // 2:], 0, out=z[:, d // 2:])  # ReLU-like half: many exact zeros at the minimum
    return z, y, g


def timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


@contextmanager
def per_replicate_loop() -> Iterator[None]:
    """Inside, estimate evaluates its null and bootstrap one Stat call per replicate and class (the reference)."""
    saved = separation._BATCHED
    separation._BATCHED = False
    try:
        yield
    finally:
        separation._BATCHED = saved


def single(args: argparse.Namespace) -> None:
    z, y, g = synthetic(args.n, args.d)
    print(f"embeddings {z.shape} {z.dtype}, 2 classes x 2 groups, 50 bins")
    base, t_base = timed(paper_attribute_tv, z, y, g)
    ours, t_ours = timed(estimate, z, y, g, distance="tv_paper")
    diff = max(abs(base[k] - ours[k]) for k in ("value", "value_y0", "value_y1"))
    rows = [("paper loop (np.histogram per dimension)", t_base, 1.0, "")]
    rows.append(("tv_paper vectorised (estimate)", t_ours, t_base / t_ours, f"{diff:.2e}"))
    for dist in ("tv_paper", "tv"):
        one = t_ours if dist == "tv_paper" else timed(estimate, z, y, g, distance=dist)[1]
        res, t_null = timed(estimate, z, y, g, distance=dist, permutations=args.perms, seed=0)
        naive = args.perms * one
        rows.append((f"{dist}: R={args.perms} x one estimate", naive, t_base / naive, ""))
        rows.append((f"{dist}: permutation null R={args.perms} (shared)", t_null - one,
                     naive / (t_null - one), f"p={res['p_value']:.3f}"))
    print(f"\n{'method':52} {'seconds':>9} {'ratio':>8}  note")
    for name, sec, ratio, note in rows:
        print(f"{name:52} {sec:9.3f} {ratio:8.2f}  {note}")
    print(f"\nspeed ratio tv_paper: {t_base / t_ours:.1f}x; largest |difference|: {diff:.2e}; "
          f"value {ours['value']:.6f}")
    print("ratios of the null rows are (R x one estimate) / (shared null)")


def replicates(args: argparse.Namespace) -> bool:
    """Per-replicate loop against the batched path; True if every field of every record is identical."""
    z, y, g = synthetic(args.rep_n, args.rep_d)
    print(f"\nreplicates: embeddings {z.shape} {z.dtype}, R={args.rep_perms} permutations, B={args.rep_boot} "
          "bootstrap resamples, 50 bins")
    print(f"{'distance':10} {'per replicate (s)':>18} {'batched (s)':>12} {'ratio':>7}  fields")
    same = True
    for dist in ("tv_paper", "tv"):
        kw = {"distance": dist, "permutations": args.rep_perms, "bootstrap": args.rep_boot, "seed": 0}
        new, t_new = timed(estimate, z, y, g, **kw)
        with per_replicate_loop():
            old, t_old = timed(estimate, z, y, g, **kw)
        differ = [k for k in old if repr(old[k]) != repr(new[k])]  # repr: exact for floats, and NaN equals NaN
        same &= not differ
        print(f"{dist:10} {t_old:18.2f} {t_new:12.2f} {t_old / t_new:7.1f}  "
              f"{'all identical' if not differ else 'DIFFER: ' + ', '.join(differ)}")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("single", "replicates"), help="run one section (default: both)")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--perms", type=int, default=100)
    ap.add_argument("--rep-n", type=int, default=4000, help="replicates section: embeddings (demo scale)")
    ap.add_argument("--rep-d", type=int, default=1568)
    ap.add_argument("--rep-perms", type=int, default=200)
    ap.add_argument("--rep-boot", type=int, default=100)
    args = ap.parse_args()
    if args.only != "replicates":
        single(args)
    if args.only != "single" and not replicates(args):
        sys.exit(1)


if __name__ == "__main__":
    main()
