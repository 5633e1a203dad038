"""How few tokens a text can take, known before it is tokenized: pure arithmetic.

A prompt that cannot fit must be refused before it is tokenized, because tokenizing it is
what costs: llama.cpp took 7.8 s and some 900 MB to tokenize a 30 MB prompt that was then
refused. The bound: every character of the text lands in the piece of some token, and no
piece is longer than the vocabulary's longest, so a text of ``n`` characters takes at
least ``n / longest_piece`` tokens. It holds for llama.cpp's SPM and BPE tokenizers, which
drop no input (byte-level BPE keeps every byte; SPM turns a space, or ``▁``, into a piece
of at least one byte). Two exceptions, both handled here: a special token whose attributes
strip the whitespace beside it (``LSTRIP``/``RSTRIP``) swallows that whitespace, so then
only non-whitespace characters count; and tokenizers that normalise text (WordPiece,
Unigram, RWKV, PLaMo-2) drop characters, so they get no bound at all (``longest_piece``
0): their text is tokenized whole, off the event loop, and bounded by the request's size.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NO_BOUND", "STRIPPED_WHITESPACE", "TokenBound"]

STRIPPED_WHITESPACE = " \t\n\v\f\r"
"""What llama.cpp strips beside an LSTRIP/RSTRIP special token: C's ``isspace``."""


@dataclass(frozen=True)
class TokenBound:
    """What a vocabulary says about the fewest tokens a text can take."""

    longest_piece: int  # bytes of the longest token piece (special tokens' text included)
    strips_whitespace: bool = False  # some special token strips the whitespace beside it

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens ``text`` takes (0 when the vocabulary gives none).

        Characters, not bytes: no encoding of a huge text, and SPM turns the three-byte
        ``▁`` into a one-byte space, so only characters are sure to reach a piece.
        """
        if self.longest_piece <= 0:
            return 0
        counted = len(text)
        if self.strips_whitespace:
            counted -= sum(text.count(c) for c in STRIPPED_WHITESPACE)
        return -(-counted // self.longest_piece)


NO_BOUND = TokenBound(longest_piece=0)
"""For tokenizers that may drop characters: every text may take as few as 0 tokens."""
