"""2×2 max pooling with stride 2 that is bit-identical to ``F.max_pool2d`` and several times faster on the CPU.

Why: profiling a SimpleCNN pre-training epoch on this project's 2-CPU machines (torch 2.14, one thread, batches of
128 × 3 × 28 × 28) put 36% of the time in ``max_pool2d_with_indices``: 17 ms for one 128 × 16 × 28 × 28 forward,
where four strided slices and three ``maximum`` calls take 2 ms. Torch's NCHW CPU kernel is not vectorised for this
layout. This module computes the same outputs and the same indices (the first maximum of each window in row-major
order, NaN taking precedence, as torch's kernel) in one compiled pass, and hands the backward to torch's own
``max_pool2d_with_indices_backward``, so gradients are the same operation on the same indices: training is
bit-identical (tests/test_vision.py compares checkpoints).

Contiguous float32 and bfloat16 CPU tensors with even height and width take the compiled path; anything else (CUDA,
odd sizes, other dtypes) goes to ``F.max_pool2d``. bfloat16 (``amp = "bf16"`` pre-training) is widened to float32 for
the scan, which is exact (every bfloat16 is a float32; comparisons, NaN and signed zeros are unchanged) and the
maximum narrowed back, also exact. Torch's own bfloat16 kernel branches on the data: 11-15 ms for a random-valued
128 × 16 × 28 × 28 forward (49% of an autocast pre-training step on random images, one thread), 5-6 ms when most
windows tie (the coloured digits' black background), against about 2 ms here; on the demo's digits the epoch times
did not differ measurably (1.13-1.21 s either way).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import nn


@njit(cache=True, boundscheck=False, nogil=True)
def _pool_forward(x, out, idx, with_idx):  # pragma: no cover - compiled
    """Max over each 2×2 window of x (B, H, W) into out (B, H/2, W/2); if ``with_idx``, idx = the flat h·W + w of
    the window's first maximum (row-major scan, ``val > max or isnan(val)`` replaces), as torch's CPU kernel.
    Inference passes ``with_idx = False`` and any idx: no gradient needs the indices."""
    planes, height, width = x.shape
    for p in range(planes):
        for i in range(height // 2):
            top = 2 * i
            for j in range(width // 2):
                left = 2 * j
                best = -np.inf
                where = top * width + left
                for di in range(2):
                    for dj in range(2):
                        val = x[p, top + di, left + dj]
                        if val > best or np.isnan(val):
                            best = val
                            where = (top + di) * width + left + dj
                out[p, i, j] = best
                if with_idx:
                    idx[p, i, j] = where


_NO_IDX = np.zeros((1, 1, 1), dtype=np.int64)


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        idx = torch.empty((n, c, h // 2, w // 2), dtype=torch.int64)
        out = _pool(x.detach(), idx)
        ctx.save_for_backward(x, idx)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, [2, 2], [2, 2], [0, 0],
                                                               [1, 1], False, idx)


def _pool(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The pooled values of a contiguous (n, c, h, w) CPU tensor (float32 or bfloat16, scanned in float32), and the
    indices into ``idx`` unless it is None."""
    n, c, h, w = x.shape
    wide = x.float()  # the tensor itself when float32; an exact widening of bfloat16
    out = torch.empty((n, c, h // 2, w // 2), dtype=torch.float32)
    _pool_forward(wide.numpy().reshape(n * c, h, w), out.numpy().reshape(n * c, h // 2, w // 2),
                  _NO_IDX if idx is None else idx.numpy().reshape(n * c, h // 2, w // 2), idx is not None)
    return out.to(x.dtype)  # the maximum is one of the inputs: narrowing back is exact


def _compiled(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4
            and x.is_contiguous() and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.numel() > 0)


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` (kernel 2, stride 2, no padding), the same values, indices and gradients."""
    if not _compiled(x):
        return F.max_pool2d(x, 2)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool2x2.apply(x)
    return _pool(x.detach(), None)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` computed by :func:`max_pool_2x2` (no parameters, so state_dict keys are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_2x2(x)

    def extra_repr(self) -> str:
        return "kernel_size=2, stride=2"
