"""transformers vision encoders (ViT, DINOv2, CLIP and SigLIP vision towers) loaded offline from a local folder.

The encoder is any ``AutoModel`` saved with ``save_pretrained`` that takes ``pixel_values`` and returns
``last_hidden_state`` (and, for ``pooling = "pooler"``, ``pooler_output``): a ``ViTModel``, a ``Dinov2Model``, a
``CLIPVisionModel``/``SiglipVisionModel`` folder, or a full ``CLIPModel``/``SiglipModel`` folder, of which its
``.vision_model`` is used (the text tower is dropped). It loads with ``local_files_only`` from ``options.model_dir``;
nothing reaches for the network. This is the image twin of :mod:`backends.text`.

Paper context (method.md §1.5): the foundation-model runs embed chest X-rays with RAD-DINO (a DINOv2, the CLS
token, 768-d: ``pooling = "cls"``) and SigLIP (its vision tower's ``pooler_output``: ``pooling = "pooler"``; SigLIP
has no CLS token), and fine-tune SigLIP with LoRA (r 16, α 32, dropout 0.05 on ``q_proj``/``v_proj``; AdamW lr 5e-5,
wd 1e-4, batch 32, at most 6 epochs, warm-up + cosine, grad clip 1.0, patience 3): ``finetune(mode="lora")`` with
``optimizer = "adamw"``, ``schedule = "cosine"``, ``warmup_epochs``, ``grad_clip = 1.0``. Without
``lora.target_modules`` the adapters go on the attention's query and value projections, found by name: ``q_proj``/
``v_proj`` (CLIP, SigLIP, and ViT/DINOv2 in transformers 5) or ``query``/``value`` (ViT/DINOv2 before 5).

Inputs are uint8 arrays (n, C, H, W) (memory-mapped caches are read batch by batch, never copied whole). Each batch
becomes float with :class:`backends.images.BatchTransform`: the spec's ``[backbone.transform]``, whose
``normalize = "auto"`` means the model folder's own ``image_mean``/``image_std`` (``preprocessor_config.json``;
ImageNet's when the folder has none); its augmentations apply only while training. One-channel images given to a
three-channel model are repeated to three channels. The images must have the model's ``config.image_size`` (set
``[backbone.transform] resize = [s, s]``); with ``interpolate_pos_encoding = true`` other sizes run too, the
position embeddings interpolated (ViT, CLIP, SigLIP pass the flag; DINOv2 always interpolates).

Modes (method.md §3): ``pretrain`` trains encoder + a fresh ``Linear(d, 2)`` head on the pre-training split (with
``max_epochs = 0`` the encoder is used as loaded: the paper's frozen RAD-DINO / SigLIP embeddings);
``finetune(mode="full")`` trains the whole encoder from a checkpoint with a fresh head; ``finetune(mode="lora")``
trains LoRA adapters (peft) and a fresh head, then MERGES the adapters into the encoder weights, so every checkpoint
has the same layout and ``embed``/``predict_proba`` need no peft. ``last_layer`` is the engine's (a head on cached
embeddings). Training runs :func:`backends.head.fit` (cross-entropy, seeded batch order and augmentations, early
stopping and selection on val balanced accuracy) with the options' recipe (:class:`backends.head.Recipe`): AdamW by
default here (as the text backbone and the paper's ViT/SigLIP runs), Adam with ``optimizer = "adam"``. Training is
float32 unless the settings' ``amp = "bf16"``; ``dtype`` affects only inference.

Checkpoint state: ``torch.save`` bytes of ``{"format", "pooling", "encoder", "head"}``, loadable with
``weights_only=True``; ``encoder`` is empty when the encoder is the one in the folder unchanged (pre-training with
0 epochs), ``head`` is empty when no head was trained.

To add a model family: it works as is when ``AutoModel`` loads it, its forward takes ``pixel_values`` and returns
``last_hidden_state``, and its config has ``hidden_size`` and ``image_size``. If its LoRA targets are not named
``q_proj``/``v_proj`` or ``query``/``value``, add the pair to :data:`LORA_DEFAULTS` (or set ``lora.target_modules``);
a family without a CLS token goes into :data:`NO_CLS`; one that always interpolates its position embeddings into
:data:`ALWAYS_INTERPOLATES`; a composite model whose vision tower is not ``.vision_model`` needs a line in
:func:`vision_tower`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from backends.base import Checkpoint
from backends.checkpoints import EncoderCheckpoints
from backends.errors import BackendError
from backends.head import Recipe, as_tensor, autocast, fit, resolve_device, resolve_settings
from backends.images import IMAGENET_MEAN, IMAGENET_STD, BatchTransform
from backends.regularisers import PenaltyTerm, Regularisation
from backends.text import LoraOptions
from backends.text_model import WEIGHT_FILES, folder_digest

NAME = "hf_vision"
POOLINGS = ("cls", "mean", "pooler")
NO_CLS = ("siglip", "siglip2")  # model_type prefixes whose token 0 is a patch, not a CLS token
ALWAYS_INTERPOLATES = ("dinov2",)  # model_type prefixes whose forward interpolates position embeddings itself
# LoRA targets when lora.target_modules is not set: the first pair whose names the encoder has
LORA_DEFAULTS = (("q_proj", "v_proj"), ("query", "value"))


class Options(Recipe):
    """``[backbone.options]`` of the ``hf_vision`` backbone: the model, its embedding, and the training recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: str = Field(
        ..., description="Folder saved with save_pretrained (config.json, weights, optionally preprocessor_config.json)"
        " holding a ViT, DINOv2, CLIP/SigLIP vision model, or a full CLIP/SigLIP model (its vision tower is used)."
    )
    pooling: Literal["cls", "mean", "pooler"] = Field(
        "cls", description="Embedding: the CLS token (RAD-DINO), the mean over all tokens, or the model's "
        "pooler_output (SigLIP's attention pool; SigLIP has no CLS token)."
    )
    batch_size: int = Field(64, ge=1, description="Images per forward pass in embed/predict_proba (not training).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype of embed/predict_proba (bfloat16 = CPU/GPU autocast); outputs are "
        "float32."
    )
    interpolate_pos_encoding: bool = Field(
        False, description="Run on images whose size differs from the model's config.image_size by interpolating "
        "its position embeddings; false = such images are an error (set [backbone.transform] resize)."
    )
    lora: LoraOptions = Field(
        default_factory=LoraOptions, description="LoRA for finetune mode 'lora'. Unset target_modules = the "
        "attention's query and value projections, q_proj/v_proj (CLIP, SigLIP; ViT and DINOv2 in transformers 5) or "
        "query/value (ViT, DINOv2 in older transformers), whichever the encoder has."
    )
    optimizer: Literal["adam", "adamw"] = Field(
        "adamw", description="AdamW (decoupled weight decay, the default here) or Adam (L2 in the gradient)."
    )


class VisionClassifier(nn.Module):
    """Encoder + pooling (:meth:`features`) + a linear head (:meth:`classify`); ``forward`` gives logits."""

    def __init__(self, encoder: nn.Module, pooling: str, dim: int, forward_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.forward_kwargs = dict(forward_kwargs)
        self.head = nn.Linear(dim, 2)  # PyTorch's default (Kaiming-uniform) initialisation

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (n, d) of float pixel values (n, C, H, W)."""
        return pool(self.encoder(pixel_values=pixels, **self.forward_kwargs), self.pooling)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (n, 2) of pooled embeddings."""
        return self.head(features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(pixels))


def pool(outputs: Any, pooling: str) -> torch.Tensor:
    """Pool an encoder's outputs: ``cls`` (token 0), ``mean`` (all tokens) or ``pooler`` (``pooler_output``)."""
    if pooling == "pooler":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise BackendError(f"{NAME}: pooling 'pooler' needs a model with a pooler, and this one returns no "
                               "pooler_output; fix: set backbone.options pooling = 'cls' or 'mean'")
        return pooled
    hidden = outputs.last_hidden_state
    return hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder of a loaded model: ``.vision_model`` of a composite (CLIP, SigLIP), else the model."""
    config = getattr(model, "config", None)
    tower = getattr(model, "vision_model", None)
    if tower is not None and getattr(config, "vision_config", None) is not None:
        return tower
    return model


# ---- model folders -----------------------------------------------------------------------------------------------

def check_model_dir(directory: Path) -> None:
    """BackendError naming ``directory`` and what it lacks (config.json, weights), before loading."""
    if not directory.is_dir():
        raise BackendError(f"{NAME}: model directory {directory} does not exist; fix: set backbone.options.model_dir "
                           "to a folder saved with save_pretrained() (config.json and weights)")
    present = {p.name for p in directory.iterdir()}
    missing = [] if "config.json" in present else ["config.json"]
    if not present & set(WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if missing:
        raise BackendError(f"{NAME}: model directory {directory} lacks {'; '.join(missing)}; fix: save the model "
                           "there with model.save_pretrained() (and its image processor with save_pretrained())")


def _signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()))


@functools.lru_cache(maxsize=2)
def _load_cached(directory: str, signature: tuple[tuple[str, int, int], ...]) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing file fails fast instead of reaching for the Hub
    try:
        import transformers
        from transformers import AutoModel
    except ImportError as e:
        raise BackendError(f"{NAME} backbone needs transformers: pip install -e .") from e
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a broken folder
        raise BackendError(f"{NAME}: cannot load the model in {directory} ({type(e).__name__}: {e}); fix: check that "
                           "the folder holds a complete save_pretrained() output of a vision model") from e
    encoder = vision_tower(model)
    config = getattr(encoder, "config", None)
    if getattr(config, "image_size", None) is None or not getattr(config, "hidden_size", None):
        raise BackendError(f"{NAME}: the model in {directory} ({type(model).__name__}) is not a vision encoder (its "
                           "config has no image_size or hidden_size); fix: point backbone.options.model_dir at a ViT, "
                           "DINOv2, CLIP or SigLIP folder")
    return encoder.eval()


def load_encoder(directory: Path) -> nn.Module:
    """The vision encoder in ``directory`` in eval mode, offline; cached per process (callers copy it)."""
    check_model_dir(directory)
    return _load_cached(str(directory), _signature(directory))


def image_stats(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on [0, 1] pixels from the folder's ``preprocessor_config.json``; ImageNet's when it has none."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        config = json.loads(path.read_text())
        if config.get("do_normalize") is False:
            return (0.0,), (1.0,)
        mean, std = config.get("image_mean"), config.get("image_std")
        if mean is None or std is None:
            return IMAGENET_MEAN, IMAGENET_STD
        mean = tuple(float(v) for v in (mean if isinstance(mean, list) else [mean]))
        std = tuple(float(v) for v in (std if isinstance(std, list) else [std]))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise BackendError(f"{NAME}: {path} cannot be read ({type(e).__name__}: {e}); fix: save a valid image "
                           "processor config there, or remove the file (ImageNet's mean/std are then used)") from e
    if len(mean) != len(std) or min(std) <= 0:
        raise BackendError(f"{NAME}: {path} has image_mean {list(mean)} and image_std {list(std)}; they need one "
                           "value per channel and std > 0; fix: correct the file, or set [backbone.transform] mean and "
                           "std")
    return mean, std


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


class HFVisionBackend(EncoderCheckpoints):
    """The :class:`backends.base.Backend` for transformers vision encoders.

    Args:
        settings: Training settings of :meth:`pretrain` (lr, weight_decay, batch_size, max_epochs, patience,
            lr_patience, device, amp); stored here, validated on first use.
        options: Backbone options, validated by :class:`Options`.
        transform: The spec's ``[backbone.transform]`` (normalisation, augmentations), or None.
    """

    name = NAME
    modes = ("last_layer", "full", "lora")  # fine-tuning modes it supports
    regularisable = True  # pre-training and fine-tuning take a separation penalty (backends.regularisers)
    takes_transform = True  # gets [backbone.transform] (backends.images.BatchTransform)
    Options = Options

    def __init__(self, settings: dict[str, Any], options: dict[str, Any] | None = None,
                 transform: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.options = Options.model_validate(options or {})
        self.transform = transform

    @staticmethod
    def weights_digest(options: dict[str, Any]) -> str | None:
        """sha256 of the model folder's files: the engine hashes it into the pre-training id, so a changed folder
        re-runs what depends on it."""
        directory = Path(Options.model_validate(options).model_dir).expanduser().resolve()
        return folder_digest(str(directory), _signature(directory))

    @staticmethod
    def check_image_shape(options: dict[str, Any], shape: tuple[int, ...]) -> None:
        """Before any training (the engine calls it with the decoded images' (C, H, W)): the model's
        ``config.image_size``, read from its config.json, unless ``interpolate_pos_encoding`` is on."""
        opts = Options.model_validate(options)
        if opts.interpolate_pos_encoding:
            return
        path = Path(opts.model_dir).expanduser().resolve() / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # loading the model reports a bad folder with its own fix
        size = (config.get("vision_config") or {}).get("image_size", config.get("image_size"))
        if size is not None and tuple(shape[1:]) != _size(size):
            want = _size(size)
            raise BackendError(f"{NAME}: images decode to {shape[1]}×{shape[2]} and the model in {path.parent} takes "
                               f"{want[0]}×{want[1]} (config.image_size); fix: set [backbone.transform] resize = "
                               f"[{want[0]}, {want[1]}] (or backbone.options interpolate_pos_encoding = true)")

    # ---- the Backend protocol ------------------------------------------------------------------------------------

    def pretrain(self, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *, seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Train the encoder with a fresh head on the pre-training split (natural proportions).

        Args:
            inputs: uint8 (n, C, H, W) training images; y: their 0/1 labels (n,).
            val_inputs: uint8 (m, C, H, W) val images, used for scheduling, early stopping and selection; val_y:
                their 0/1 labels.
            seed: Seeds the head's initialisation, dropout, augmentations and the batch order; same seed, same
                result on the CPU.
            regulariser: A separation penalty on the pooled features (:mod:`backends.regularisers`); None = none.

        Returns:
            The best-epoch checkpoint. With ``max_epochs == 0`` or no training images, the encoder as loaded and no
            head (then :meth:`predict_proba` is unavailable).
        """
        settings = resolve_settings(self.settings, self.name)
        if settings["max_epochs"] == 0 or len(inputs) == 0:
            encoder = load_encoder(self._model_dir())  # a missing or broken folder, or a wrong pooling, fails here
            self._dim(encoder), self._forward_kwargs(encoder)
            return self._checkpoint(None, None, {"trained": False, "epochs": 0, "history": []})
        model = self._classifier(self._base_encoder(), seed)
        log = self._train(model, inputs, y, val_inputs, val_y, settings, seed, regulariser)
        return self._checkpoint(model.encoder, model.head, {"trained": True, **log})

    def embed(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float32 (n, d) pooled embeddings, computed in eval mode under ``torch.inference_mode``."""
        model = self._load(checkpoint)[0]
        images = self._images(inputs, "inputs", model)
        return self._forward(model, images, model.features, model.head.in_features).numpy()

    def predict_proba(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float64 (n,) P(y=1) from the checkpoint's own head.

        Raises:
            BackendError: the checkpoint has no trained head (pre-training ran 0 epochs).
        """
        model, has_head = self._load(checkpoint)
        if not has_head:
            raise BackendError(f"{self.name}: the pre-trained model has no task head (pre-training ran 0 epochs); "
                               "fix: set backbone.pretrain max_epochs >= 1, or use the last_layer head's predictions")
        logits = self._forward(model, self._images(inputs, "inputs", model), model, 2).double()
        return torch.softmax(logits, dim=1)[:, 1].numpy()

    def finetune(self, checkpoint: Checkpoint, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *,
                 mode: str, settings: dict[str, Any], seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Fine-tune from ``checkpoint``'s encoder with a FRESH head; keep the best val balanced accuracy epoch.

        Args:
            checkpoint: A checkpoint of this backend (its head, if any, is not used).
            inputs: uint8 training images (n, C, H, W); y: their 0/1 labels.
            val_inputs: uint8 val images (m, C, H, W); val_y: their 0/1 labels.
            mode: ``"full"`` (every encoder weight trains) or ``"lora"`` (only LoRA adapters and the head train; the
                adapters are merged into the encoder weights of the returned checkpoint).
            settings: Training settings (lr, weight_decay, batch_size, max_epochs, patience, lr_patience, ...).
            seed: Seeds the head and adapter initialisation, dropout, augmentations and the batch order.

        Returns:
            A checkpoint whose :meth:`predict_proba` and :meth:`embed` use the fine-tuned model.
        """
        resolved = resolve_settings(settings, self.name)
        if resolved["max_epochs"] < 1:
            raise BackendError(f"{self.name}: finetune needs max_epochs >= 1, got {resolved['max_epochs']}")
        model = self.build_model(checkpoint, mode=mode, seed=seed)
        log = self._train(model, inputs, y, val_inputs, val_y, resolved, seed, regulariser)
        encoder = model.encoder.merge_and_unload() if mode == "lora" else model.encoder
        extra = {"lora": {**self.options.lora.model_dump(), "target_modules": self._lora_targets(encoder)}} \
            if mode == "lora" else {}
        return self._checkpoint(encoder, model.head, {"trained": True, "mode": mode, **extra, **log})

    def build_model(self, checkpoint: Checkpoint, *, mode: str, seed: int) -> VisionClassifier:
        """The model :meth:`finetune` trains: the checkpoint's encoder (LoRA-wrapped for ``"lora"``) + a fresh head.

        Raises:
            BackendError: an unknown mode, or ``"last_layer"`` (the engine trains that head on cached embeddings).
        """
        if mode not in ("full", "lora"):
            raise BackendError(f"{self.name}: finetune mode '{mode}' is not supported here; known modes are: full, "
                               "lora ('last_layer' is trained by the engine on cached embeddings)")
        encoder = self._encoder(self._state(checkpoint))
        kwargs = self._forward_kwargs(encoder)  # from the unwrapped model (peft's forward hides the signature)
        torch.manual_seed(seed)  # LoRA's A matrices are random: seed them with the head
        if mode == "lora":
            encoder = self._lora(encoder)
        return self._classifier(encoder, seed=None, forward_kwargs=kwargs)

    def fingerprint(self) -> str:
        """sha256 of the model folder's files and the options: what results depend on."""
        directory = self._model_dir()
        check_model_dir(directory)
        return hashlib.sha256((folder_digest(str(directory), _signature(directory)) + self.options.model_dump_json()
                               ).encode()).hexdigest()

    # ---- training ------------------------------------------------------------------------------------------------

    def _train(self, model: VisionClassifier, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray,
               settings: dict[str, Any], seed: int, regulariser: Regularisation | None = None) -> dict[str, Any]:
        images, val_images = self._images(inputs, "inputs", model), self._images(val_inputs, "val_inputs", model)
        for what, imgs, labels in (("train", images, y), ("val", val_images, val_y)):
            if len(imgs) == 0 or np.shape(labels) != (len(imgs),):
                raise BackendError(f"{self.name}: {what} set needs n > 0 images and n labels, got {len(imgs)} "
                                   f"images and labels of shape {np.shape(labels)}")
        device = resolve_device(settings.get("device", "auto"))
        transform = self._batch_transform()
        torch.manual_seed(seed)  # dropout, augmentations (and an adversary's initialisation)
        penalty = PenaltyTerm.of(regulariser, model.head.in_features, len(images))

        channels = self._channels(model)

        def prepare(idx: torch.Tensor) -> torch.Tensor:
            return self._pixels(images[idx.numpy()], device, transform, channels, train=True)

        recipe = self.options
        log = fit(
            model, torch.arange(len(images)), as_tensor(y, np.int64),
            lambda: self._forward(model, val_images, model, 2).argmax(dim=1), as_tensor(val_y, np.int64),
            settings=settings, seed=seed, prepare=prepare, optimizer=recipe.optimizer_factory(settings),
            schedule=recipe.schedule_factory(settings["max_epochs"]), grad_clip=recipe.grad_clip, penalty=penalty,
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"epochs": log.epochs, "best_epoch": log.best_epoch, "best_val_bal_acc": log.best_val_bal_acc,
                "history": log.history, "trainable_params": trainable}

    def _lora_targets(self, encoder: nn.Module) -> list[str]:
        lora = self.options.lora
        if "target_modules" in lora.model_fields_set:
            return list(lora.target_modules)
        names = {name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, nn.Linear)}
        for pair in LORA_DEFAULTS:
            if set(pair) <= names:
                return list(pair)
        raise BackendError(f"{self.name}: the model in {self._model_dir()} has no attention projections named "
                           f"{' or '.join('/'.join(p) for p in LORA_DEFAULTS)}; fix: set backbone.options "
                           "lora.target_modules to names of its linear layers")

    def _lora(self, encoder: nn.Module) -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise BackendError(f"{self.name}: finetune mode 'lora' needs peft: pip install -e .") from e
        lora = self.options.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=self._lora_targets(encoder), bias="none")
        try:
            with warnings.catch_warnings():  # peft 0.21 reads a transformers attribute deprecated in v5
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(encoder, config)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise BackendError(f"{self.name}: LoRA cannot wrap the encoder ({e}); fix: set backbone.options "
                               "lora.target_modules to names of its linear layers") from e

    # ---- images --------------------------------------------------------------------------------------------------

    def _batch_transform(self) -> BatchTransform:
        return BatchTransform(self.transform, imagenet=False, default=image_stats(self._model_dir()))

    def _images(self, inputs: Any, what: str, model: VisionClassifier) -> np.ndarray:
        """``inputs`` as a uint8 (n, C, H, W) array (not copied), checked against the model's channels and size."""
        array = inputs if isinstance(inputs, np.ndarray) else np.asarray(inputs)
        if array.dtype != np.uint8 or array.ndim != 4:
            raise BackendError(f"{self.name}: {what} must be uint8 images (n, channels, height, width), got "
                               f"{array.dtype} {array.shape}")
        if len(array) == 0:
            return array
        config, channels = self._config(model), self._channels(model)
        if array.shape[1] != channels and not (array.shape[1] == 1 and channels == 3):
            raise BackendError(f"{self.name}: {what} have {array.shape[1]} channels and the model in "
                               f"{self._model_dir()} takes {channels}; fix: set [backbone.transform] channels = "
                               f"{channels}")
        want = _size(config.image_size)
        if tuple(array.shape[2:]) != want and not self.options.interpolate_pos_encoding:  # else _forward_kwargs
            raise BackendError(f"{self.name}: {what} are {array.shape[2]}×{array.shape[3]} images and the model in "
                               f"{self._model_dir()} takes {want[0]}×{want[1]} (config.image_size); fix: set "
                               f"[backbone.transform] resize = [{want[0]}, {want[1]}] (or backbone.options "
                               "interpolate_pos_encoding = true to run at this size)")
        return array

    @staticmethod
    def _pixels(batch: np.ndarray, device: torch.device, transform: BatchTransform, channels: int, *,
                train: bool) -> torch.Tensor:
        """uint8 (b, C, H, W) numpy → normalised float32 pixels on ``device`` (one channel repeated to three)."""
        x = as_tensor(batch, np.uint8).to(device, non_blocking=True)
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return transform(x, train=train)

    def _forward(self, model: VisionClassifier, images: np.ndarray, fn: Any, width: int) -> torch.Tensor:
        """``fn`` over every image in batches of ``options.batch_size``, in eval mode; float32 (n, width), in order."""
        n = len(images)
        out = torch.empty((n, width), dtype=torch.float32)
        bf16 = self.options.dtype == "bfloat16" or self.settings.get("amp") == "bf16"
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        transform, channels = self._batch_transform(), self._channels(model)
        step = self.options.batch_size
        with torch.inference_mode(), autocast({"amp": "bf16" if bf16 else "none"}, device):
            for start in range(0, n, step):
                pixels = self._pixels(images[start : start + step], device, transform, channels, train=False)
                out[start : start + step] = fn(pixels).float().cpu()
        model.train(was_training)
        return out

    # ---- models and checkpoints ----------------------------------------------------------------------------------

    def _model_dir(self) -> Path:
        return Path(self.options.model_dir).expanduser().resolve()

    def _base_encoder(self) -> nn.Module:
        """A fresh copy of the encoder as loaded from the directory (training mutates it)."""
        return copy.deepcopy(load_encoder(self._model_dir()))

    def _config(self, model: VisionClassifier | nn.Module) -> Any:
        encoder = model.encoder if isinstance(model, VisionClassifier) else model
        return encoder.config  # a peft wrapper forwards .config to the base model

    def _channels(self, model: VisionClassifier) -> int:
        return int(getattr(self._config(model), "num_channels", 3) or 3)

    @staticmethod
    def _always_interpolates(config: Any) -> bool:
        return str(getattr(config, "model_type", "")).startswith(ALWAYS_INTERPOLATES)

    def _forward_kwargs(self, encoder: nn.Module) -> dict[str, Any]:
        if not self.options.interpolate_pos_encoding:
            return {}
        if "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters:
            return {"interpolate_pos_encoding": True}
        if self._always_interpolates(encoder.config):
            return {}
        raise BackendError(f"{self.name}: the model in {self._model_dir()} ({type(encoder).__name__}) cannot "
                           "interpolate its position embeddings; fix: set backbone.options interpolate_pos_encoding "
                           "= false and [backbone.transform] resize to its config.image_size")

    def _classifier(self, encoder: nn.Module, seed: int | None,
                    forward_kwargs: dict[str, Any] | None = None) -> VisionClassifier:
        dim = self._dim(encoder)
        kwargs = self._forward_kwargs(encoder) if forward_kwargs is None else forward_kwargs
        if seed is not None:
            torch.manual_seed(seed)
        return VisionClassifier(encoder, self.options.pooling, dim, kwargs)

    def _dim(self, encoder: nn.Module) -> int:
        """Width of the pooled embedding; BackendError for pooling 'cls' on a model without a CLS token."""
        config = encoder.config
        model_type = str(getattr(config, "model_type", ""))
        if self.options.pooling == "cls" and model_type.startswith(NO_CLS):
            raise BackendError(f"{self.name}: the model in {self._model_dir()} ({model_type}) has no CLS token, so "
                               "pooling 'cls' would take one image patch; fix: set backbone.options pooling = "
                               "'pooler' (the paper's SigLIP) or 'mean'")
        dim = int(config.hidden_size)
        if self.options.pooling == "pooler":
            dim = int(getattr(config, "pooler_output_size", None) or dim)
        return dim


