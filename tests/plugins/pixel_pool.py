"""A complete alloclab backbone in one small file (README "Plugins"): average-pooled pixels as the embedding.

Use it from a spec as ``kind = "pixel_pool:PixelPool"`` with this folder on PYTHONPATH, or register it in your
package's pyproject.toml under ``[project.entry-points."alloclab.backbones"]``.
"""

import io

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from backends.base import Checkpoint


class PixelPool:
    name = "pixel_pool"
    modes = ("last_layer",)  # heads on cached embeddings are the engine's; nothing else to implement

    class Options(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        grid: int = Field(4, ge=1, description="Pool each channel to grid x grid cells.")

    def __init__(self, settings, options=None):
        self.settings, self.options = settings, self.Options(**(options or {}))

    def pretrain(self, inputs, y, val_inputs, val_y, *, seed, regulariser=None):
        buffer = io.BytesIO()
        torch.save({"grid": torch.tensor(self.options.grid)}, buffer)  # nothing to learn
        return Checkpoint(backbone=self.name, state=buffer.getvalue(), log={"trained": False})

    def embed(self, checkpoint, inputs):
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32) / 255.0  # uint8 (n, C, H, W)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, self.options.grid)
        return pooled.flatten(1).numpy().astype(np.float32)

    def predict_proba(self, checkpoint, inputs):
        raise NotImplementedError("no task head: pre-training trains nothing")
