"""Checkpoint bytes of the backbones that store a dict of state dicts (text, hf_vision, torchvision).

``pack`` writes ``torch.save`` bytes of plain CPU tensors (loadable anywhere with ``weights_only=True``); ``unpack``
reads them back and checks the backbone and the layout version, turning any failure into one BackendError that says
to re-run pre-training.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from backends.base import Checkpoint
from backends.errors import BackendError


def detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as contiguous CPU copies (loads anywhere, shares nothing with the live model)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def pack(backbone: str, state: dict[str, Any], log: dict[str, Any]) -> Checkpoint:
    """``state`` (tensors, numbers, strings) as a :class:`Checkpoint` of ``backbone``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return Checkpoint(backbone=backbone, state=buffer.getvalue(), log=log)


def unpack(checkpoint: Checkpoint, backbone: str, fmt: int) -> dict[str, Any]:
    """The state dict of a checkpoint written by :func:`pack` for ``backbone`` with layout version ``fmt``.

    Raises:
        BackendError: another backbone's checkpoint, bytes torch cannot load, or another layout.
    """
    if checkpoint.backbone != backbone:
        raise BackendError(f"{backbone}: checkpoint is from backbone '{checkpoint.backbone}'; "
                           f"re-run pre-training with {backbone}")
    try:
        state = torch.load(io.BytesIO(checkpoint.state), weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types (pickle, zip, RuntimeError) for a bad file
        raise BackendError(f"{backbone}: checkpoint cannot be loaded ({type(e).__name__}: {e}); "
                           "it is corrupt: re-run pre-training") from e
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise BackendError(f"{backbone}: checkpoint has an unknown layout; re-run pre-training")
    return state
