"""A CLIP tokenizer whose vocabulary is a word list, written by the package itself (no download): what a small
text-conditional teacher made offline needs, in the files diffusers' Stable Diffusion pipelines load
(``tokenizer/vocab.json``, ``merges.txt``, ``tokenizer_config.json`` for ``CLIPTokenizer``).

CLIP's tokenizer is byte-level BPE (Radford et al. 2021, after GPT-2): a word starts as its byte characters, the last
one marked ``</w>``, and pairs are merged in the order of ``merges.txt``. The vocabulary here is the 256 byte
characters (plain and word-final), so any text tokenizes, plus, for each word of the list, the merges that build it
left to right: a listed word is one token, an unlisted one falls back to smaller pieces.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

START, END = "<|startoftext|>", "<|endoftext|>"


def byte_characters() -> list[str]:
    """The 256 printable characters GPT-2 / CLIP byte-level BPE stands each byte for (printable Latin-1 bytes as
    themselves, the others shifted past 255), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """The merges that build each word (lower-cased ASCII) left to right, ending in its ``</w>`` piece; once each."""
    merges: dict[tuple[str, str], None] = {}
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            merges[(cur, p)] = None
            cur += p
    return list(merges)


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], max_length: int = 16):
    """Write a ``CLIPTokenizer`` for ``words`` (padded / truncated to ``max_length`` tokens, start and end included)
    into ``folder`` and return it loaded from there."""
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words if w.strip()})
    if any(not w.isascii() or not w.isalpha() for w in words):
        raise ValueError("tokenizer words must be ASCII letters only")
    chars = byte_characters()
    vocab = chars + [c + "</w>" for c in chars]
    merges = word_merges(words)
    vocab += [a + b for a, b in merges]
    vocab = list(dict.fromkeys(vocab)) + [START, END]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=int(max_length),
                        bos_token=START, eos_token=END, unk_token=END, pad_token=END)
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
