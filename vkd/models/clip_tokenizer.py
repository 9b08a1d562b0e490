"""CLIP's tokenizer without a download: ``transformers.CLIPTokenizer`` built from the BPE file ``open_clip`` ships.

The vocabulary is the one of ``openai/clip-vit-large-patch14`` (Stable Diffusion's tokenizer): 256 byte tokens, the
same with ``</w>``, the 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407, also SD's pad
token). ``vocab.json`` + ``merges.txt`` are written once to the vkd cache (:func:`vkd.cache.build_once`), so a
tokenizer loads with ``from_pretrained`` like the hub's, and ``save_pretrained`` copies it into a pipeline.

Examples:
    >>> tok = clip_tokenizer()  # doctest: +SKIP
    >>> tok("a handwritten seven").input_ids  # doctest: +SKIP
    [49406, 320, 35192, 5757, 49407]
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from pathlib import Path

from vkd.cache import build_once, cache_dir

__all__ = ["CLIP_VOCAB_SIZE", "CLIP_BOS_ID", "CLIP_EOS_ID", "clip_bpe_path", "clip_vocab_dir", "clip_tokenizer"]

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407  # <|startoftext|>, <|endoftext|> (also the pad token of SD's tokenizer)
_VOCAB_DIR_NAME = "clip-bpe-tokenizer-v1"


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file that ``open_clip`` ships (found without importing ``open_clip``, which is slow)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed: it ships the CLIP BPE vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map of the 256 bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _write_vocab(path: Path) -> None:
    """``vocab.json`` + ``merges.txt`` into a temporary sibling of ``path``, then renamed into place."""
    # The vocabulary as open_clip's SimpleTokenizer builds it (HF names the two special tokens the same; same ids).
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{clip_bpe_path()}: expected {CLIP_VOCAB_SIZE} tokens, built {len(vocab)}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    # HF's merges.txt starts with a version line that the readers skip, like the first line of the .gz file.
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def clip_vocab_dir() -> Path:
    """The cached directory with CLIP's ``vocab.json`` + ``merges.txt`` (built on first use, ≈ 0.5 s)."""
    path = cache_dir() / _VOCAB_DIR_NAME
    build_once(path, lambda: (path / "merges.txt").is_file(), lambda: _write_vocab(path))
    return path


def clip_tokenizer(max_length: int = 77):
    """SD's CLIP tokenizer, offline (same ids as ``openai/clip-vit-large-patch14``).

    It is ``transformers.CLIPTokenizer`` (in transformers 5 the ``tokenizers``-backed one; there is no slow one any
    more), loaded with ``from_pretrained`` from the cached ``vocab.json`` + ``merges.txt``.

    Args:
        max_length: ``model_max_length`` (77, CLIP's context, in the real checkpoints).

    Returns:
        A fresh ``CLIPTokenizer``: bos 49406, eos = pad = 49407, 49408 tokens.
    """
    from transformers import CLIPTokenizer  # slow to import (seconds); only text-to-image code needs it

    return CLIPTokenizer.from_pretrained(clip_vocab_dir(), model_max_length=max_length)
