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


class EncoderCheckpoints:
    """Checkpoint methods shared by the transformers backbones (text, hf_vision): the state is ``{"format",
    "pooling", "encoder", "head"}``, with an empty ``encoder`` when it is the folder's unchanged (pre-training with 0
    epochs) and an empty ``head`` when none was trained. The backend class provides what is declared below."""

    checkpoint_format = 1  # version of the checkpoint layout
    name: str
    settings: dict[str, Any]
    options: Any  # with ``pooling``

    def _model_dir(self) -> Any:
        raise NotImplementedError

    def _base_encoder(self) -> Any:
        raise NotImplementedError

    def _classifier(self, encoder: Any, seed: int | None) -> Any:
        raise NotImplementedError

    def _encoder(self, state: dict[str, Any]) -> Any:
        encoder = self._base_encoder()
        if state["encoder"]:
            try:
                encoder.load_state_dict(state["encoder"])
            except RuntimeError as e:
                raise BackendError(f"{self.name}: checkpoint's encoder does not fit the model in {self._model_dir()} "
                                   f"({e}); re-run pre-training with this model_dir") from e
        return encoder

    def _checkpoint(self, encoder: Any, head: Any, log: dict[str, Any]) -> Checkpoint:
        pooling = self.options.pooling
        state = {"format": self.checkpoint_format, "pooling": pooling,
                 "encoder": {} if encoder is None else detached(encoder.state_dict()),
                 "head": {} if head is None else detached(head.state_dict())}
        return pack(self.name, state, {"model_dir": str(self._model_dir()), "pooling": pooling, **log})

    def _state(self, checkpoint: Checkpoint) -> dict[str, Any]:
        return unpack(checkpoint, self.name, self.checkpoint_format)

    def _load(self, checkpoint: Checkpoint) -> tuple[Any, bool]:
        """(model in eval mode on the settings' device, whether it has a trained head) of ``checkpoint``."""
        from backends.head import resolve_device

        state = self._state(checkpoint)
        if state["pooling"] != self.options.pooling:
            raise BackendError(f"{self.name}: checkpoint was trained with pooling '{state['pooling']}' but the "
                               f"options say '{self.options.pooling}'; re-run pre-training")
        model = self._classifier(self._encoder(state), seed=0)
        if state["head"]:
            model.head.load_state_dict(state["head"])
        return model.eval().to(resolve_device(self.settings.get("device", "auto"))), bool(state["head"])
