"""The long-output task of the decode benchmark: copy a passage from the prompt.

Compaction during decode matters for long outputs, and the cleanest long output whose every token
can be checked is a copy: the prompt holds a passage of simple English narrative (sentences drawn
from templates and word lists with a seeded RNG: names, places, objects, times; SmolLM2-135M
copies such prose well, unlike code-laden docstrings) and asks for it again, verbatim::

    Copy the text below exactly.

    Text:
    <passage>

    Copy:

The answer is the passage's own token ids, so generation runs as long as the passage (greedy,
``max_tokens`` = its length) and every generated token must attend back into the prompt — the
hardest case for a cache that evicts while it generates. A case scores the fraction of the
passage reproduced before the first wrong token.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

PREFIX = "Copy the text below exactly.\n\nText:\n"
SUFFIX = "\n\nCopy:\n"


@dataclass(frozen=True)
class CopyCase:
    id: str
    length: int  # passage tokens (= output tokens)
    prompt_ids: list[int]
    answer_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NAMES = ("Anna", "Tomas", "Mira", "Jonas", "Elena", "Pavel", "Lucia", "Omar", "Greta", "Ivan",
         "Sofia", "Marco", "Nadia", "Felix", "Clara", "Hugo", "Ines", "Leo", "Rosa", "Viktor")
PLACES = ("harbor", "market", "old mill", "library", "bridge", "forest", "garden", "station",
          "lighthouse", "bakery", "school", "river bank", "hill", "church", "square", "farm")
THINGS = ("lantern", "letter", "blue box", "wooden boat", "map", "silver key", "basket of apples",
          "small bell", "red scarf", "notebook", "compass", "loaf of bread", "clock", "kite")
ADJS = ("quiet", "cold", "bright", "windy", "long", "busy", "grey", "warm", "strange", "calm")
TIMES = ("in the morning", "at noon", "in the evening", "late at night", "on Sunday",
         "after the rain", "before dawn", "in the spring", "during the storm")
TEMPLATES = (
    "{a} walked to the {p} {t} and found a {th} near the door.",
    "It was a {adj} day, so {a} stayed at the {p} and read about the sea.",
    "{a} gave the {th} to {b}, who smiled and put it in a pocket.",
    "The {p} was {adj} {t}, and nobody spoke for a long time.",
    "{b} asked {a} where the {th} came from, but {a} did not remember.",
    "{t} the two friends, {a} and {b}, met at the {p} to talk about the journey.",
    "Nobody knew why the {th} had been left at the {p}.",
    "{a} wrote a short note, folded it twice, and hid it under the {th}.",
    "When the bells rang, {b} ran from the {p} to the {q} without stopping.",
    "The people of the town said that the {p} had always been {adj}.",
)


def passage_text(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        a, b = rng.sample(NAMES, 2)
        p, q = rng.sample(PLACES, 2)
        out.append(rng.choice(TEMPLATES).format(a=a, b=b, p=p, q=q, th=rng.choice(THINGS),
                                                adj=rng.choice(ADJS), t=rng.choice(TIMES)))
    text = " ".join(out)
    return text[0].upper() + text[1:]


def build_cases(tokenizer: Any, lengths: list[int], per_cell: int, *, seed: int = 0
                ) -> list[CopyCase]:
    """``per_cell`` passages of each length (tokens), from a seeded RNG."""
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    prefix, suffix = encode(PREFIX), encode(SUFFIX)
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for i in range(per_cell):
            ids = encode(passage_text(rng, length // 8))
            while len(ids) < length:
                ids = encode(tokenizer.decode(ids) + " " + passage_text(rng, 4))
            passage = ids[:length]
            # Decode and encode again so the passage is what the model itself would write.
            passage = encode(tokenizer.decode(passage))[:length]
            cases.append(CopyCase(f"copy{length}-{i:03d}", length, prefix + passage + suffix,
                                  passage))
    return cases


def score(answer_ids: list[int], output_ids: list[int]) -> float:
    """Fraction of the passage reproduced before the first wrong token."""
    n = 0
    for a, b in zip(answer_ids, output_ids):
        if a != b:
            break
        n += 1
    return n / len(answer_ids)
