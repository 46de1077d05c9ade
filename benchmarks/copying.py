"""The long-output task of the decode benchmark: copy a passage from the prompt.

Compaction during decode matters for long outputs, and the cleanest long output whose every token
can be checked is a copy: the prompt holds a passage of English prose (paragraphs of Python's own
documentation without code or markup, from ``pydoc_data``, in a seeded order; SmolLM2-135M
copies such prose well, unlike code-laden docstrings or templated sentences, whose repeats make
the next sentence ambiguous) and asks for it again, verbatim::

    Copy the following text exactly.

    Text:
    <passage>

    Copy the text above exactly.

    Copy:
    <the passage's first 8 tokens>

The answer is the rest of the passage's token ids, so generation runs as long as the passage (greedy,
``max_tokens`` = its length) and every generated token must attend back into the prompt — the
hardest case for a cache that evicts while it generates. A case scores the fraction of the
passage's tokens the output reproduces in order (:func:`score`).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

#: Tokens of the copy given at the end of the prompt (the model continues from there).
ANCHOR = 8
PREFIX = "Copy the following text exactly.\n\nText:\n"
SUFFIX = "\n\nCopy the text above exactly.\n\nCopy:\n"


@dataclass(frozen=True)
class CopyCase:
    id: str
    length: int  # passage tokens (= output tokens)
    prompt_ids: list[int]
    answer_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prose_paragraphs() -> list[str]:
    """Paragraphs of plain English prose from Python's own documentation (``pydoc_data``, in
    every CPython): those without code, markup or digits, whitespace normalised."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    out = []
    for p in text.split("\n\n"):
        p = " ".join(p.split())
        if len(p) > 200 and p.count(".") >= 2 and not re.search(
                r"[()\[\]{}=<>_`*#/\\|0-9]|\.\.\.|>>>|::", p):
            out.append(p)
    return list(dict.fromkeys(out))


def build_cases(tokenizer: Any, lengths: list[int], per_cell: int, *, seed: int = 0
                ) -> list[CopyCase]:
    """``per_cell`` passages of each length (tokens), from a seeded RNG."""
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    prefix, suffix = encode(PREFIX), encode(SUFFIX)
    paragraphs = prose_paragraphs()
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for i in range(per_cell):
            order = rng.sample(paragraphs, len(paragraphs))  # each passage its own order
            ids: list[int] = []
            for p in order:
                ids += encode(p + " ")
                if len(ids) >= length:
                    break
            passage = ids[:length + ANCHOR]
            # Decode and encode again so the passage is what the model itself would write.
            passage = encode(tokenizer.decode(passage))[:length + ANCHOR]
            # The copy is started for the model (its first ANCHOR tokens end the prompt): the
            # task is to go on copying, which is what every later token needs anyway.
            cases.append(CopyCase(f"copy{length}-{i:03d}", length,
                                  prefix + passage + suffix + passage[:ANCHOR],
                                  passage[ANCHOR:]))
    return cases


def score(answer_ids: list[int], output_ids: list[int]) -> float:
    """Fraction of the passage's tokens the output reproduces, in order (the matching blocks of
    a diff of the two token sequences; a stray newline or a skipped sentence costs what it
    misses, not the rest of the copy)."""
    import difflib

    m = difflib.SequenceMatcher(None, answer_ids, output_ids, autojunk=False)
    return sum(b.size for b in m.get_matching_blocks()) / len(answer_ids)
