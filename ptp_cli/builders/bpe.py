"""The built-in tiny model's tokenizer: a deterministic byte-level BPE learnt from a fixed corpus."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

from ptp_cli.text.tokenization import BOS_TOKEN, EOS_TOKEN, INTERNVL2_SPECIAL_TOKENS, UNK_TOKEN

_TINY_CORPUS = """\
What is in the image? Describe the image in detail. How many people are in the picture?
What colour is the car on the left? The car on the left is red and the bus behind it is yellow.
Read the text on the sign. The sign says OPEN from 9 to 5. What time does the clock show?
There are three cats and two dogs sitting on a green sofa next to the window.
Is the man wearing a hat? Yes, he is wearing a black hat and a blue coat.
Which animal is the largest? The elephant is the largest animal in the photo.
Answer the question using a single word or phrase. Please answer yes or no.
The chart shows the number of visitors per year. Which year had the most visitors?
A woman is riding a bicycle down a quiet street, and a child is walking a small dog.
Where is the cup? The cup is on the table, between the plate and the book.
What is written at the top of the page? The title of the document is printed in large letters.
How much does the coffee cost? The menu lists the price of the coffee as three dollars.
"""

_TINY_MERGES = 256  # BPE merges learnt from _TINY_CORPUS


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the character standing for each byte value 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _train_bpe(words: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on pre-tokenised words; ties go to the lexicographically smallest pair (deterministic)."""
    counts: dict[tuple[str, ...], int] = {}
    for w in words:
        key = tuple(w)
        counts[key] = counts.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: dict[tuple[str, str], int] = {}
        for symbols, n in counts.items():
            for pair in pairwise(symbols):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in counts.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        counts = merged
    return merges


def build_tiny_tokenizer(
    out_dir: Path,
    *,
    extra_special_tokens: Sequence[str] = (),
    corpus: str = _TINY_CORPUS,
    num_merges: int = _TINY_MERGES,
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for the built-in tiny model into ``out_dir``.

    Byte-level BPE: ids 0-2 are ``<unk>``, ``<s>``, ``</s>`` (as in InternLM2), then the 256 byte tokens,
    then ``num_merges`` merges learnt from ``corpus`` (the built-in mini model passes its own), then the other
    InternVL2-2B special tokens and ``extra_special_tokens`` (e.g. another template's role tokens, for tests).
    BOS is added on encode. Byte-for-byte deterministic.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as BackendTokenizer

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [w for line in corpus.splitlines() for w, _ in pre.pre_tokenize_str(line)]
    merges = _train_bpe(words, num_merges)
    vocab: dict[str, int] = {}
    for tok in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *_byte_alphabet(), *(a + b for a, b in merges)):
        vocab.setdefault(tok, len(vocab))
    specials = list(dict.fromkeys([*INTERNVL2_SPECIAL_TOKENS, *extra_special_tokens]))
    for tok in specials:
        if tok in vocab and vocab[tok] >= 3:
            raise ValueError(f"special token {tok!r} collides with a learnt merge")
        vocab.setdefault(tok, len(vocab))

    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t in specials if t not in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)],
        "added_tokens_decoder": {
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for t in specials
        },
        "model_max_length": 32768,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
