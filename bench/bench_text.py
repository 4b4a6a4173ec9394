"""Text-backend throughput: MiniLM embeddings/s on this machine, tokenisation vs model time, batch size.

Embeds about 1000 real RedditBias comments with the ``text`` backend (the pre-trained MiniLM, no pre-training) at
batch sizes 32/64/128 and max_length 128, and compares it with a baseline run in the same process: the same model
with every text padded to max_length and batches in data order (what a plain ``tokenizer(padding="max_length")``
loop does). The backend instead pads each batch to its longest text and sorts texts by length.

    .venv/bin/python bench/bench_text.py                  # ~1000 texts, float32
    .venv/bin/python bench/bench_text.py --n 2000 --dtype bfloat16 --threads 1

The timings are wall-clock and the machine may be shared: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends import text, text_model  # noqa: E402
from backends.datasets import redditbias  # noqa: E402


def texts_sample(n: int) -> np.ndarray:
    """About ``n`` RedditBias comments (a seeded subset stratified by file, all splits together)."""
    bundle = redditbias.load(redditbias.Options(limit=n))
    return np.concatenate([bundle.inputs(s) for s in bundle.splits])


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def baseline(backend: text.TextBackend, texts: np.ndarray, batch_size: int, max_length: int) -> float:
    """Seconds to embed ``texts`` padded to ``max_length``, in data order (mean pooling), tokenisation included."""
    tokenizer, encoder = text_model.load_pretrained(str(backend._model_dir()))
    t0 = time.perf_counter()
    enc = tokenizer(texts.tolist(), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = {k: v[start : start + batch_size] for k, v in enc.items() if k != "token_type_ids"}
            text.pool(encoder(**batch), batch["attention_mask"], "mean")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="texts to embed")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = texts_sample(args.n)
    n = len(texts)
    options = {"max_length": args.max_length, "dtype": args.dtype}
    probe = text.TextBackend({"max_epochs": 0}, options)
    ckpt = probe.pretrain(texts[:0], np.zeros(0), texts[:0], np.zeros(0), seed=0)
    _, load_s = timed(lambda: text_model.load_pretrained(str(probe._model_dir())))
    tokens, tok_s = timed(lambda: probe._tokens(texts, "texts"))
    lengths = tokens.lengths.numpy()
    print(f"{n} RedditBias texts, max_length {args.max_length}, dtype {args.dtype}, torch threads "
          f"{torch.get_num_threads()}; tokens per text: median {np.median(lengths):.0f}, max {lengths.max()}")
    print(f"model load (cold): {load_s:.2f} s; tokenisation (once per text list, then cached): {tok_s:.3f} s "
          f"= {n / tok_s:,.0f} texts/s\n")
    probe.embed(ckpt, texts[:64])  # warm-up (thread pools, first-call allocations)

    columns = ("batch", "model s", "emb/s", "tok share", "baseline s", "emb/s", "speed-up")
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, (5, 8, 7, 9, 10, 7, 8))))
    print("-" * 74)
    for bs in args.batch_sizes:
        backend = text.TextBackend({"max_epochs": 0}, {**options, "batch_size": bs})
        vectors, model_s = timed(lambda: backend.embed(ckpt, texts))  # tokens come from the cache
        assert vectors.shape == (n, 384) and vectors.dtype == np.float32
        base_s = baseline(backend, texts, bs, args.max_length)
        total = model_s + tok_s
        print(f"{bs:>5} | {model_s:>8.2f} | {n / model_s:>7.0f} | {tok_s / total:>8.1%} | {base_s:>10.2f} | "
              f"{n / base_s:>7.0f} | {base_s / total:>6.2f}x")
    print("\nemb/s = embeddings per second of model time; tok share = tokenisation / (tokenisation + model) for one "
          "uncached pass; speed-up = baseline / backend (tokenisation included in both).")


if __name__ == "__main__":
    main()
