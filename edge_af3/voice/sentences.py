"""Streamed answer text -> sentences, as early as they are known to be whole.

A sentence ends at `.`, `!`, `?` or `…` followed by white space (and, for a period, not after an
abbreviation, an initial, a list number or inside a number: "Dr. Smith", "e.g. this", "U.S.",
"3.14", "1. First"), at CJK full stops `。！？` (no space follows them), and at a line break (lists,
headings). Text with no such mark is still cut — at a clause mark (, ; : — 、，) once it is long
enough, else at a space once it is too long — so a voice never waits for an answer with no
punctuation at all. The first cut comes sooner (clause marks count from `first_min` characters):
what matters for a voice is when the first audio starts.
"""

from __future__ import annotations

ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf approx fig no vol ch sec ca al inc ltd co
    jan feb mar apr jun jul aug sep sept oct nov dec min max est dept univ gen col lt sgt""".split()
)
_CJK_END = "。！？"
_CLAUSE = ",;:—、，；："


def _ends_sentence(text: str, i: int) -> bool:
    """Whether the mark at text[i] ends a sentence, given what follows it (text[i + 1:] starts
    with white space or is the end)."""
    mark = text[i]
    if mark in "!?…":
        return True
    # a period: look at the word before it
    j = i
    while j > 0 and not text[j - 1].isspace():
        j -= 1
    word = text[j:i].strip("\"'“”‘’()[]")
    if not word:
        return True
    low = word.lower()
    if low in ABBREVIATIONS or low.rstrip(".") in ABBREVIATIONS:
        return False
    if len(word) == 1 and word.isalpha():  # an initial: "J. S. Bach"
        return False
    if "." in word and all(len(p) <= 2 for p in word.split(".")):  # U.S. / a.m. / e.g.
        return False
    if word.isdigit() and (j == 0 or text[j - 1] == "\n"):  # a list number: "1. First"
        return False
    return True


def split_sentences(text: str) -> list[str]:
    """The sentences of a whole text, cut as a streamed one would be."""
    cutter = SentenceCutter()
    return cutter.feed(text) + cutter.flush()


class SentenceCutter:
    """`feed(piece)` returns the sentences completed by it; `flush()` the rest at the end."""

    def __init__(self, *, first_min: int = 24, clause_min: int = 80, max_len: int = 240):
        self.first_min, self.clause_min, self.max_len = first_min, clause_min, max_len
        self._buf = ""
        self._cut_any = False

    def feed(self, piece: str) -> list[str]:
        self._buf += piece
        out = []
        while True:
            n = self._next_cut()
            if n is None:
                break
            sentence, self._buf = self._buf[:n], self._buf[n:]
            self._cut_any = True
            sentence = " ".join(sentence.split())
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> list[str]:
        rest = " ".join(self._buf.split())
        self._buf = ""
        return [rest] if rest else []

    def _next_cut(self) -> int | None:
        buf = self._buf
        for i, ch in enumerate(buf):
            if ch == "\n" and buf[:i].strip():
                return i + 1
            if ch in _CJK_END:
                return i + 1
            if ch in ".!?…" and i + 1 < len(buf) and buf[i + 1].isspace():
                # "3." then " " -> a list number only at a line start; "3.14" never reaches here
                if _ends_sentence(buf, i):
                    return i + 1
        # no sentence end yet: a long clause, or a long run of words, is cut anyway
        least = self.clause_min if self._cut_any else self.first_min
        if len(buf) >= least:
            for i in range(len(buf) - 2, least - 2, -1):
                if buf[i] in _CLAUSE and buf[i + 1].isspace():
                    return i + 1
        if len(buf) >= self.max_len:
            space = buf.rfind(" ", 0, self.max_len)
            return space + 1 if space > 0 else self.max_len
        return None
