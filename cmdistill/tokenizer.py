"""A CLIP tokenizer whose vocabulary is a word list, written by the package itself (no download): what a small
text-conditional teacher made offline needs, in the files diffusers' Stable Diffusion pipelines load
(``tokenizer/vocab.json``, ``merges.txt``, ``tokenizer_config.json`` for ``CLIPTokenizer``).

CLIP's tokenizer is byte-level BPE (Radford et al. 2021, after GPT-2): a word starts as its byte characters, the last
one marked ``</w>``, and pairs are merged in the order of ``merges.txt``. The vocabulary here is the 256 byte
characters (plain and word-final), so any text tokenizes, plus merges under which each word of the list is one token
(:func:`word_merges`); an unlisted word falls back to smaller pieces.
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


def bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's pieces: merge the present pair of lowest rank until none is in ``ranks``."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges under which each word (lower-cased ASCII) is one token: for each word in turn, the pieces the merges so
    far leave it in are joined left to right by merges appended after all others. An appended merge ranks below
    every earlier one, so it never changes how an earlier word is merged (BPE takes the present pair of lowest rank,
    and an earlier word always has one until it is whole)."""
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        pieces = bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        cur = pieces[0]
        for p in pieces[1:]:
            ranks.setdefault((cur, p), len(ranks))
            cur += p
    return sorted(ranks, key=ranks.get)


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
