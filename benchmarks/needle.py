"""The needle task of the accuracy benchmark: a planted number in filler text, asked for by raw
completion.

Every peer (our vLLM server, the recency baseline, kvpress on HF transformers) receives the *same
token ids*, built here once, so tokenisation cannot differ between them. A case's prompt has
exactly ``length`` tokens (a multiple of 32, so that with 32-token KV blocks every budget of the
sweep is met exactly: the placement keeps ``N - E = budget`` tokens per KV head)::

    <filler ...> The secret number is 48213. Remember it. <filler ...>
    What is the secret number? The secret number is

The needle sits at ``depth`` (fraction of the filler before it); depths sweep (0, 1) evenly, the
numbers and the filler's starting offsets come from a seeded RNG, so a cell of ``per_cell`` cases
is reproducible. An answer is right when the completion's first digits are the number.

Fillers: ``prose`` (default) — the Python standard library's docstrings, varied English with
little repetition, so the model has to find the needle by content; ``passkey`` — the repeated
"The grass is green..." sentences of the passkey-retrieval task (Mohtashami & Jaggi,
arXiv:2305.16300), an easier task.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

NEEDLE = "The secret number is {number}. Remember it."
QUESTION = "\nWhat is the secret number? The secret number is"
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
_PROSE_MODULES = ("collections", "functools", "itertools", "json", "re", "argparse", "logging",
                  "pathlib", "subprocess", "threading", "unittest", "typing", "dataclasses",
                  "decimal", "fractions", "statistics", "textwrap", "difflib", "heapq", "bisect",
                  "email", "http.client", "urllib.request", "asyncio", "contextlib", "csv",
                  "enum", "inspect", "os", "shutil", "socket", "string", "tarfile", "zipfile")
FILLERS = ("prose", "passkey")
BLOCK_MULTIPLE = 32


@dataclass(frozen=True)
class Case:
    """One prompt of the task (``prompt_ids`` has exactly ``length`` tokens)."""

    id: str
    length: int
    depth: float
    answer: str
    prompt_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filler_text(kind: str) -> str:
    """The filler text (deterministic for a given Python version)."""
    if kind == "passkey":
        return PASSKEY_FILLER * 2000
    if kind != "prose":
        raise ValueError(f"filler must be one of {FILLERS}, got {kind!r}")
    parts = []
    for name in _PROSE_MODULES:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            # Digits in the filler would compete with the needle; drop such paragraphs.
            if doc and len(doc) > 200 and not re.search(r"\d", doc):
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


def build_cases(tokenizer: Any, lengths: list[int], per_cell: int, *, seed: int = 0,
                filler: str = "prose") -> list[Case]:
    """``per_cell`` cases for each prompt length, token ids built with ``tokenizer`` (HF)."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    stream = encode(filler_text(filler))
    question = encode(QUESTION)
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        if length % BLOCK_MULTIPLE:
            raise ValueError(f"prompt length {length} is not a multiple of {BLOCK_MULTIPLE}")
        for i in range(per_cell):
            number = str(rng.randrange(10_000, 100_000))
            depth = (i + 0.5) / per_cell
            needle = encode(" " + NEEDLE.format(number=number) + " ")
            n_filler = length - len(needle) - len(question)
            if n_filler > len(stream):
                raise ValueError(f"filler too short for a {length}-token prompt")
            start = rng.randrange(0, len(stream) - n_filler + 1)
            body = stream[start:start + n_filler]
            cut = int(n_filler * depth)
            ids = body[:cut] + needle + body[cut:] + question
            assert len(ids) == length
            cases.append(Case(f"n{length}-{i:03d}", length, round(depth, 4), number, ids))
    return cases


def is_correct(completion: str, answer: str) -> bool:
    """Right when the completion's first run of digits is exactly the planted number."""
    m = re.match(r"\s*(\d+)", completion)
    return bool(m) and m.group(1) == answer
