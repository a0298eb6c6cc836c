"""CLIP's byte-level BPE tokenizer without torch: the same ids as open_clip's ``SimpleTokenizer``.

open_clip's tokenizer module imports torch (it returns torch tensors), which would take the
preprocess process from ~80 MiB to ~800 MiB resident for a dictionary lookup. This module does
the same work with the standard library, numpy, ftfy and regex only:

1. clean: ``ftfy.fix_text``, ``html.unescape`` twice, collapse whitespace, lower-case;
2. split into words with CLIP's pattern (special tokens, English contractions, letter runs,
   single digits, runs of other non-space characters);
3. map each word's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table), mark the
   last one with ``</w>`` and merge pairs by BPE rank;
4. look the pieces up in the vocabulary (256 bytes, 256 bytes + ``</w>``, the merges, then
   ``<start_of_text>`` and ``<end_of_text>``).

Unlike open_clip, the per-word BPE cache is bounded (``functools.lru_cache``): a long-running
server tokenizing user text would otherwise grow without limit.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from itertools import islice, pairwise
from pathlib import Path

import ftfy
import numpy as np
import regex

from inferline.common.errors import ConfigError, InvalidInput

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
# CLIP uses the first 49152 - 256 - 2 merges: with 512 byte tokens and 2 special tokens the
# vocabulary then has 49408 entries.
MERGE_COUNT = 49152 - 256 - 2
DEFAULT_CACHE_SIZE = 65536


def default_vocab_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip (whose
    package import pulls in torch)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / VOCAB_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ConfigError(
        f"CLIP tokenizer vocabulary {VOCAB_FILENAME} not found{where}: install open_clip_torch, "
        "or set the clip_tokenize recipe's 'vocab' param to the path of the file"
    )


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table: printable Latin-1 bytes map to
    themselves, the other bytes (controls, space, ...) to 256 + n in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order: the printable bytes, then the remapped ones (open_clip's order)


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP's tokenizer built from a BPE merges file (``bpe_simple_vocab_16e6.txt.gz``)."""

    def __init__(self, vocab_path: str | Path | None = None, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        try:
            # Read only the merges used (line 0 is a header): the file holds ~262k lines, and
            # reading all of them would leave a freed but not returned peak in the process.
            with gzip.open(path, "rt", encoding="utf-8", newline="\n") as handle:
                merges = [tuple(line.split()) for line in islice(handle, 1, MERGE_COUNT + 1)]
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the CLIP BPE vocabulary {path}: {exc}") from None
        if len(merges) != MERGE_COUNT or any(len(pair) != 2 for pair in merges):
            raise ConfigError(f"{path} is not a CLIP BPE vocabulary ({MERGE_COUNT} merge pairs expected)")
        self.vocab_path = path
        self._byte_encoder = _byte_to_unicode()
        byte_symbols = list(self._byte_encoder.values())
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(pair) for pair in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder: dict[str, int] = {token: index for index, token in enumerate(vocab)}
        self._ranks: dict[tuple[str, str], int] = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        self.sot_token_id = self.encoder[START_OF_TEXT]
        self.eot_token_id = self.encoder[END_OF_TEXT]
        self.vocab_size = len(self.encoder)
        self._pattern = regex.compile(
            rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._bpe_cached = lru_cache(maxsize=cache_size)(self._bpe)

    def cache_info(self):
        """The BPE word cache's ``functools`` statistics (hits, misses, maxsize, currsize)."""
        return self._bpe_cached.cache_info()

    def _bpe(self, word: str) -> tuple[str, ...]:
        """One word (byte-mapped characters) -> its BPE pieces, the last one ending in ``</w>``."""
        if word in (START_OF_TEXT, END_OF_TEXT):
            return (word,)
        symbols = [*word[:-1], word[-1] + "</w>"]
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens or padding."""
        ids: list[int] = []
        encoder, byte_encoder = self.encoder, self._byte_encoder
        for word in self._pattern.findall(_clean(text)):
            mapped = "".join(byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(encoder[piece] for piece in self._bpe_cached(mapped))
        return ids

    def tokenize(self, text: str, context_length: int = 77) -> np.ndarray:
        """int64 ``(context_length,)``: start token, the text's ids, end token, zeros.

        Refuses (``InvalidInput``) an empty text and one that does not fit: open_clip would cut
        it off, and the embedding would describe a different text.
        """
        if not text.strip():
            raise InvalidInput("text is empty; give the words to embed (e.g. 'a photo of a dog')")
        ids = self.encode(text)
        if not ids:
            raise InvalidInput("text has no tokens once cleaned (only control or invisible characters?)")
        count = len(ids) + 2
        if count > context_length:
            raise InvalidInput(
                f"text is {count} tokens, the model takes at most {context_length}; shorten it "
                "(open_clip would cut it off and embed a different text)"
            )
        tokens = np.zeros(context_length, dtype=np.int64)
        tokens[0] = self.sot_token_id
        tokens[1 : count - 1] = ids
        tokens[count - 1] = self.eot_token_id
        return tokens
