"""Small local tokenizers for tests, built without internet access.

Why hand-built: tests must not download real vocabularies, yet need both tokenizer families LAMP
handles: WordPiece (BERT: lower-cases, ignores leading spaces) and byte-level BPE (RoBERTa: a word
after a space is a different token, ``" think"`` -> ``Ġthink``).

* :func:`make_bert_tokenizer`: a word-level ``BertTokenizerFast`` (every listed word is one token,
  anything else is ``[UNK]``) from a ``vocab.txt``.
* :func:`make_roberta_tokenizer`: a ``RobertaTokenizerFast`` over the full 256-symbol byte
  alphabet whose only merges build ``Ġ<word>`` for the listed words, so each word is a single token
  after a space and splits into bytes elsewhere (e.g. at sentence start), like real RoBERTa for
  rare words. Its ``<mask>`` strips the space to its left, as in ``roberta-base``.
* :func:`make_modernbert_tokenizer`: the same byte-level BPE in ModernBERT's layout (GPT-NeoX
  style, a ``PreTrainedTokenizerFast`` from ``tokenizer.json``): ``[CLS] ... [SEP]`` around a
  text, no token types, and a ``[MASK]`` that strips the space to its left, as in
  ``answerdotai/ModernBERT-base``.

Both save their files to ``tmp_dir`` so ``AutoTokenizer.from_pretrained(tmp_dir)`` also works, and
the vocabulary order is deterministic for a given word list.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# ModernBERT keeps its specials after the BPE vocabulary, in this order (ids 50280..50284).
MODERNBERT_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
PUNCTUATION = tuple(".,;:!?'\"-()")


def words_of(texts: Iterable[str]) -> list[str]:
    """Unique words of ``texts`` (letters/digits runs, ``[MASK]`` removed), first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[A-Za-z0-9]+", text.replace("[MASK]", " ")):
            seen.setdefault(word, None)
    return list(seen)


def make_bert_tokenizer(
    tmp_dir: str | os.PathLike[str], words: Iterable[str]
) -> PreTrainedTokenizerBase:
    """Word-level uncased BERT tokenizer: specials, punctuation, then the lower-cased ``words``."""
    from transformers import BertTokenizerFast

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, None] = dict.fromkeys((*BERT_SPECIALS, *PUNCTUATION))
    for word in words:
        for piece in word.lower().split():
            vocab.setdefault(piece, None)
    (tmp_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(str(tmp_dir), do_lower_case=True)
    tokenizer.save_pretrained(str(tmp_dir))
    return tokenizer


def make_roberta_tokenizer(
    tmp_dir: str | os.PathLike[str], words: Iterable[str], mask_lstrip: bool = True
) -> PreTrainedTokenizerBase:
    """Byte-level BPE tokenizer in RoBERTa's layout; ``" <word>"`` is one token for each word.

    Words are used as given (case-sensitive, like RoBERTa); multi-word entries are split on spaces.
    ``mask_lstrip=False`` gives a ``<mask>`` that does not absorb the preceding space (as when a
    RoBERTa tokenizer is loaded from bare vocab/merges files).
    """
    from tokenizers import AddedToken
    from transformers import RobertaTokenizerFast

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_level_bpe(words, ROBERTA_SPECIALS)
    vocab["<mask>"] = len(vocab)
    (tmp_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    mask = AddedToken("<mask>", lstrip=mask_lstrip, rstrip=False, normalized=False, special=True)
    tokenizer = RobertaTokenizerFast.from_pretrained(str(tmp_dir), mask_token=mask)
    tokenizer.save_pretrained(str(tmp_dir))
    return tokenizer


def make_modernbert_tokenizer(
    tmp_dir: str | os.PathLike[str], words: Iterable[str]
) -> PreTrainedTokenizerBase:
    """Byte-level BPE tokenizer in ModernBERT's layout; ``" <word>"`` is one token for each word.

    Saved as ``tokenizer.json`` + ``tokenizer_config.json`` (as the hub's ModernBERT), so
    ``AutoTokenizer.from_pretrained(tmp_dir)`` gives a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_level_bpe(words, ())
    for special in MODERNBERT_SPECIALS:
        vocab[special] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    bpe.add_special_tokens([
        AddedToken(t, lstrip=t == "[MASK]", rstrip=False, normalized=False, special=True)
        for t in MODERNBERT_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(str(tmp_dir))
    return tokenizer


def make_causal_tokenizer(
    tmp_dir: str | os.PathLike[str], words: Iterable[str], bos: str | None = None
) -> PreTrainedTokenizerBase:
    """Byte-level BPE in a causal LM's layout: GPT-2's (no special tokens added, ``bos=None``)
    or Llama 3's (``bos="<|begin_of_text|>"`` starts every text). Each listed word after a
    space is one token; anything else (a word at the start, a word not listed) splits into
    bytes, so objects of several tokens occur as they do with real BPE vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    end = "<|endoftext|>"
    vocab, merges = _byte_level_bpe(words, (end,) + ((bos,) if bos else ()))
    bpe = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos or end,
                                        eos_token=end, unk_token=None, pad_token=end)
    tokenizer.save_pretrained(str(tmp_dir))
    return tokenizer


def _byte_level_bpe(words: Iterable[str], specials: Iterable[str]
                    ) -> tuple[dict[str, int], list[str]]:
    """``specials``, the 256 byte symbols, then ``Ġ<word>`` for every word, built by merges."""
    from tokenizers import pre_tokenizers

    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges: list[str] = []
    for word in words:
        for piece in word.split():
            # Only merges whose left part starts with "Ġ": they can fire only at the start of a
            # pre-tokenised chunk, so each listed word after a space becomes exactly one token.
            current = "Ġ"
            for char in piece.encode("utf-8").decode("latin-1"):
                char = _byte_symbol(char)
                merged = current + char
                if merged not in vocab:
                    vocab[merged] = len(vocab)
                    merges.append(f"{current} {char}")
                current = merged
    return vocab, merges


def _byte_symbol(latin1_char: str) -> str:
    """GPT-2's printable stand-in for one byte (the ByteLevel alphabet)."""
    b = ord(latin1_char)
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if b in printable:
        return chr(b)
    n = sum(1 for x in range(b) if x not in printable)
    return chr(256 + n)
