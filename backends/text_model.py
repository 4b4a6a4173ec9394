"""Local transformers model folders for the ``text`` backend: check, load offline, tokenise (cached per process).

A model folder is what ``save_pretrained`` writes: ``config.json``, tokenizer files and weights. It is checked before
loading, so a missing file is a :class:`BackendError` naming the folder and what it lacks; loading runs with
``HF_HUB_OFFLINE=1`` and ``local_files_only``, so nothing reaches for the network. A loaded model is cached per
process (callers copy it before training); token tensors are cached per (folder, max_length, texts).

To accept another tokenizer or weight file name, add it to :data:`TOKENIZER_FILES` or :data:`WEIGHT_FILES`.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backends.errors import BackendError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKEN_CACHE_SIZE = 16  # tokenised input lists kept per process (one per split and subset in use)


@dataclass(frozen=True)
class Tokens:
    """A tokenised text list, padded to its longest text; ``lengths`` = real tokens per text."""

    input_ids: torch.Tensor  # (n, L) int64
    attention_mask: torch.Tensor  # (n, L) int64
    lengths: torch.Tensor  # (n,) int64

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx``, trimmed to their longest text (padding past it changes nothing: it is masked)."""
        width = max(int(self.lengths[idx].max()), 1) if len(idx) else 1
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": self.attention_mask[idx, :width]}


def as_texts(inputs: Any, what: str) -> list[str]:
    """The strings of a 1-D array-like (a numpy object array of str); BackendError naming ``what`` otherwise."""
    array = np.asarray(inputs, dtype=object)
    if array.ndim != 1:
        raise BackendError(f"{what} must be a 1-D array of strings, got shape {array.shape}")
    texts = array.tolist()
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise BackendError(f"{what}[{bad}] is {type(texts[bad]).__name__}, not a string")
    return texts


def check_model_dir(directory: Path) -> None:
    """BackendError naming ``directory`` and what it lacks (config, tokenizer files, weights), before loading."""
    if not directory.is_dir():
        raise BackendError(f"text: model directory {directory} does not exist; fix: set backbone.options.model_dir to "
                           "a folder saved with save_pretrained() (config.json, tokenizer files, weights)")
    present = {p.name for p in directory.iterdir()}
    missing = []
    if "config.json" not in present:
        missing.append("config.json")
    if not present & set(TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if not present & set(WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if missing:
        raise BackendError(f"text: model directory {directory} lacks {'; '.join(missing)}; fix: save the model there "
                           "with save_pretrained() and its tokenizer with tokenizer.save_pretrained()")


@functools.lru_cache(maxsize=8)
def folder_digest(directory: str, files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the names and bytes of ``files`` (cached by their names, sizes and mtimes)."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(name.encode() + b"\0")
        with open(Path(directory) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def load_pretrained(directory: str) -> tuple[Any, nn.Module]:
    """(tokenizer, encoder in eval mode) from ``directory``, offline; cached per process (callers copy the encoder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing file fails fast instead of reaching for the Hub
    check_model_dir(Path(directory))
    try:
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise BackendError("text backend needs transformers: pip install -e .") from e
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        encoder = AutoModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a broken folder
        raise BackendError(f"text: cannot load the model in {directory} ({type(e).__name__}: {e}); fix: check that "
                           "the folder holds a complete save_pretrained() output") from e
    return tokenizer, encoder.eval()


TOKEN_CACHE: collections.OrderedDict[tuple[str, int, str], Tokens] = collections.OrderedDict()


def tokenise(directory: str, max_length: int, digest: str, texts: tuple[str, ...]) -> Tokens:
    """Tokens of ``texts`` (cached by model directory, max_length and a hash of the texts)."""
    key = (directory, max_length, digest)
    if key in TOKEN_CACHE:
        TOKEN_CACHE.move_to_end(key)
        return TOKEN_CACHE[key]
    tokenizer = load_pretrained(directory)[0]
    if not texts:
        empty = torch.zeros((0, 1), dtype=torch.int64)
        tokens = Tokens(empty, empty.clone(), torch.zeros(0, dtype=torch.int64))
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest",
                        padding_side="right", return_tensors="pt")  # right: Tokens.batch trims the tail
        mask = enc["attention_mask"].long()
        tokens = Tokens(enc["input_ids"].long(), mask, mask.sum(dim=1))
    TOKEN_CACHE[key] = tokens
    if len(TOKEN_CACHE) > TOKEN_CACHE_SIZE:
        TOKEN_CACHE.popitem(last=False)
    return tokens
