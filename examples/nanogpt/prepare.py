"""Prepare the example's corpus: the Python standard library's own top-level modules, as bytes.

Every ``*.py`` file directly in the running Python's standard library directory, in name order, joined
into one text (about 4.7 MB for CPython 3.11), tokenized as bytes (vocabulary 256: no tokenizer to ship),
and split 90/10 into ``train.bin`` and ``val.bin`` (uint16 token ids, nanoGPT's format) with a
``meta.json`` (vocab_size, sizes, the Python version and the corpus's SHA-256: the same Python gives the
same files).

    python examples/nanogpt/prepare.py                 # -> examples/nanogpt/data/
    python examples/nanogpt/prepare.py --out DIR --max-bytes 200000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "data"


def stdlib_corpus(max_bytes: int | None = None) -> bytes:
    """The standard library's top-level ``*.py`` files in name order, each after a ``# file: NAME`` line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [f"# file: {path.name}\n".encode() + path.read_bytes() for path in sorted(stdlib.glob("*.py"))]
    corpus = b"\n".join(parts)
    return corpus if max_bytes is None else corpus[:max_bytes]


def write_dataset(corpus: bytes, out: Path, *, val_fraction: float = 0.1) -> dict[str, object]:
    """Byte tokens of ``corpus`` into ``out/train.bin`` and ``out/val.bin`` (the last ``val_fraction``),
    and ``out/meta.json``; returns the metadata."""
    tokens = np.frombuffer(corpus, dtype=np.uint8).astype(np.uint16)
    cut = int(len(tokens) * (1 - val_fraction))
    out.mkdir(parents=True, exist_ok=True)
    tokens[:cut].tofile(out / "train.bin")
    tokens[cut:].tofile(out / "val.bin")
    meta: dict[str, object] = {
        "vocab_size": 256,
        "tokenizer": "bytes",
        "train_tokens": cut,
        "val_tokens": len(tokens) - cut,
        "source": "top-level *.py files of the Python standard library, in name order",
        "python": platform.python_version(),
        "sha256": hashlib.sha256(corpus).hexdigest(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"data directory (default {DEFAULT_OUT})")
    parser.add_argument("--max-bytes", type=int, default=None, help="keep only the first N bytes of the corpus")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    meta = write_dataset(stdlib_corpus(args.max_bytes), args.out)
    print(
        f"{args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens (bytes, Python "
        f"{meta['python']}) in {time.perf_counter() - started:.2f} s"
    )


if __name__ == "__main__":
    main()
