"""
prepare.py: text -> nanoGPT-format token files, with tiktoken's GPT-2 BPE ("r50k_base").

Writes DIR/train.bin and DIR/val.bin (uint16 token ids, the first 90% / last 10% of the corpus)
and DIR/meta.json (vocab size, token counts, sources). Documents are joined by <|endoftext|>.

  python prepare.py                                  # tiny shakespeare -> data/shakespeare
  python prepare.py --input a.txt b.txt --out_dir data/mine
  python prepare.py --dataset=pystdlib               # the .py files of this Python's stdlib -> data/pystdlib

The default corpus is read from $NANOFP8_TEXT when set (CI points it at a local copy), else
downloaded from its public location. The tokenizer files come from tiktoken's cache
($TIKTOKEN_CACHE_DIR) or are downloaded by tiktoken.
"""
import argparse
import json
import os
import sys
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATASETS = ("shakespeare", "pystdlib")
VAL_FRACTION = 0.1


def get_tokenizer():
    """tiktoken's GPT-2 BPE, or a SystemExit that says where the tokenizer files are looked for."""
    try:
        import tiktoken
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # no network and no cache: tiktoken raises a connection or file error
        raise SystemExit(f"cannot load the GPT-2 tokenizer (tiktoken 'r50k_base'): {e}\n"
                         f"point TIKTOKEN_CACHE_DIR at a directory holding its cached files "
                         f"(now {os.environ.get('TIKTOKEN_CACHE_DIR', 'unset')}) or allow network access") from e


def shakespeare_text() -> str:
    """The tiny-shakespeare corpus: $NANOFP8_TEXT if set, else downloaded."""
    local = os.environ.get("NANOFP8_TEXT")
    if local:
        return Path(local).read_text(encoding="utf-8")
    print(f"downloading {SHAKESPEARE_URL}")
    with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as r:
        return r.read().decode("utf-8")


def pystdlib_texts() -> list:
    """The .py files of the running Python's standard library (sorted, so the corpus is reproducible)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def tokenize(texts: list) -> np.ndarray:
    """Documents -> one uint16 array of token ids, each document followed by <|endoftext|>."""
    enc = get_tokenizer()
    assert enc.n_vocab <= 2 ** 16, "uint16 token files need a vocabulary below 65536"
    ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    out = []
    for doc in ids:
        out.extend(doc)
        out.append(enc.eot_token)
    return np.array(out, dtype=np.uint16)


def prepare(out_dir: str, inputs=None, dataset: str = "shakespeare") -> dict:
    """Tokenize `inputs` (files) or `dataset`, split 90/10, write train.bin / val.bin / meta.json."""
    if inputs:
        texts, source = [Path(f).read_text(encoding="utf-8") for f in inputs], [str(f) for f in inputs]
    elif dataset == "shakespeare":
        texts, source = [shakespeare_text()], os.environ.get("NANOFP8_TEXT", SHAKESPEARE_URL)
    elif dataset == "pystdlib":
        texts, source = pystdlib_texts(), sysconfig.get_paths()["stdlib"]
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    tokens = tokenize(texts)
    n_val = max(int(len(tokens) * VAL_FRACTION), 1)
    train, val = tokens[:-n_val], tokens[-n_val:]
    os.makedirs(out_dir, exist_ok=True)
    train.tofile(os.path.join(out_dir, "train.bin"))
    val.tofile(os.path.join(out_dir, "val.bin"))
    meta = dict(tokenizer="r50k_base", vocab_size=get_tokenizer().n_vocab, dtype="uint16",
                train_tokens=int(len(train)), val_tokens=int(len(val)), n_documents=len(texts), source=source)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out_dir}: {len(train):,} train tokens, {len(val):,} val tokens ({len(texts)} documents)")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], allow_abbrev=False)
    p.add_argument("--input", nargs="+", help="text files to tokenize (instead of --dataset)")
    p.add_argument("--dataset", choices=DATASETS, default="shakespeare")
    p.add_argument("--out_dir", help="default: data/<dataset>, or data/custom with --input")
    a = p.parse_args(argv)
    out_dir = a.out_dir or os.path.join("data", "custom" if a.input else a.dataset)
    prepare(out_dir, a.input, a.dataset)


if __name__ == "__main__":
    main(sys.argv[1:])
