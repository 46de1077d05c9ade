"""RULER-style long-context tasks, generated locally from a seed, and their scorer.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv:2404.06654) is a set of synthetic tasks whose prompts can be made any length: needle in a
haystack (NIAH) in several forms, variable tracking (VT), common words extraction (CWE) and
frequent words extraction (FWE). This module rebuilds them with RULER's templates, but from
nothing that has to be downloaded: the "essay" haystack is the Python standard library's
docstrings (``benchmarks.needle.filler_text("prose")``, no digits), the "noise" haystack is the
repeated "The grass is green..." sentences (``benchmarks.needle.PASSKEY_FILLER``), and the words of
the keys and of CWE are a word list made from that prose. It imports only the standard library and
``benchmarks.needle``, so both the main venv and the kvpress venv (no vLLM) can use it; the
tokenizer (Hugging Face) is passed in.

Every prompt is token ids, built once, so all peers receive the same tokens::

    enc(head) + enc(intro) + haystack (with the needles) + enc(question) + enc(tail) + enc(prefix)

where ``head, tail`` is the model's chat template split around the user message, ``question``
starts with a newline and ``prefix`` is RULER's answer prefix (the completion continues it).
``Case.context_len`` is the index where the question starts. The haystack gets exactly the tokens
left, so ``len(prompt_ids) == length``: the noise and essay haystacks are slices of their token
streams (tiled when the length needs more than the stream), the needles are encoded separately
(with a leading space) and inserted at sentence ends; list-like haystacks (CWE, FWE, the needle
lines of ``niah_multikey_2``) take items while the next fits, then are padded to the exact length
(a newline and the start of the noise filler; FWE pads with its "...." noise word).

Cases are reproducible: each (task, length) cell draws from its own
``random.Random(f"{seed}-{task}-{length}")``, so the same arguments give the same cases and adding
a task or a length leaves the other cells' cases unchanged. A completion is right when every
reference answer occurs in it, case-insensitively (RULER's ``string_match_all``, made binary).

Where this differs from RULER: no few-shot example in the CWE/FWE prompts; CWE at short lengths
lowers the common words' frequency (``cwe_frequencies``); the essay is stdlib docstrings, not Paul
Graham essays; FWE's coded words are 3-5 letters drawn per case (RULER: 6 letters).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import random
import re
import string
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

from benchmarks.needle import PASSKEY_FILLER, filler_text

SPLIT = "@@SPLIT@@"

# --- RULER's templates --------------------------------------------------------------------------

NIAH_INTRO = ("Some special magic {type_v} are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the {type_v} afterwards.\n")
NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_QUESTION = ("\nWhat are all the special magic {type_v} for {query} mentioned in the provided "
                 "text?")
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"

VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following "
            "text.\n\n")
VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text "
               "above.")
# RULER's typo "assgined" is kept on purpose: the prompt is RULER's.
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, "
             "{num_v} variables are assgined the value {value}, they are: ")

CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than "
             "others. Memorize the ones that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the {num_cw} most common words in the above list?"
CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"

FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the "
             "three most frequently appeared coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
                "are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = (" Answer: According to the coded text above, the three most frequently appeared "
              "words are:")

# --- parameters ---------------------------------------------------------------------------------

#: CWE: RULER's frequencies (common words 30 times, uncommon 3 times). A length too short for
#: them lowers the common frequency, never below ``CWE_MIN_RATIO`` x the uncommon one; a length
#: too long for the word list raises the uncommon frequency, never above common / ratio.
CWE_FREQ_CW = 30
CWE_FREQ_UCW = 3
CWE_MIN_RATIO = 3
#: FWE: Zipf exponent (RULER's alpha), coded vocabulary size and the noise word of rank 1.
FWE_ALPHA = 2.0
FWE_VOCAB = 500
FWE_DOTS = "...."
#: Below this many haystack tokens (besides needles) a NIAH/VT prompt is refused as too short.
MIN_HAYSTACK = 32
#: niah_multikey_2 needs at least this many distractor lines.
MIN_DISTRACTORS = 4


@dataclass(frozen=True)
class TaskSpec:
    """One task: its RULER family, haystack, parameters and generation budget."""

    name: str
    family: str          # "niah" | "vt" | "cwe" | "fwe"
    haystack: str        # "noise" | "essay" | "needles" | "word list" | "coded words"
    asks: str            # what the question asks, in words
    standard: bool       # RULER's standard difficulty (False: an easier variant)
    max_tokens: int      # generation budget
    num_keys: int = 1    # NIAH: needles with distinct keys (0: as many as fit)
    num_values: int = 1  # NIAH: values of the queried key (one needle each)
    num_queries: int = 1  # NIAH: keys asked for
    type_v: str = "numbers"  # NIAH: "numbers" (7 digits) or "uuids"
    num_hops: int = 0    # VT: chain length (num_hops + 1 variables)
    num_cw: int = 0      # CWE: common words asked for


def _niah(name: str, haystack: str, asks: str, standard: bool, max_tokens: int,
          **kw: Any) -> TaskSpec:
    return TaskSpec(name, "niah", haystack, asks, standard, max_tokens, **kw)


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    _niah("niah_single_1", "noise", "the 7-digit number of the one needle", True, 16),
    _niah("niah_single_2", "essay", "the 7-digit number of the one needle", True, 16),
    _niah("niah_single_3", "essay", "the UUID of the one needle", True, 40, type_v="uuids"),
    _niah("niah_multikey_1", "essay", "the number of one key; 4 needles with distinct keys",
          True, 16, num_keys=4),
    _niah("niah_multikey_1_easy", "essay", "the number of one key; 2 needles with distinct keys",
          False, 16, num_keys=2),
    _niah("niah_multikey_2", "needles", "the number of one key; the haystack is needle lines "
          "with distinct keys", True, 16, num_keys=0),
    _niah("niah_multivalue", "essay", "all 4 numbers of one key (4 needles)", True, 64,
          num_values=4),
    _niah("niah_multivalue_easy", "essay", "both numbers of one key (2 needles)", False, 32,
          num_values=2),
    _niah("niah_multiquery", "essay", "the numbers of 4 keys (4 needles, all asked)", True, 64,
          num_keys=4, num_queries=4),
    _niah("niah_multiquery_easy", "essay", "the numbers of 2 keys (2 needles, both asked)",
          False, 32, num_keys=2, num_queries=2),
    # Easier variants on the noise haystack: the bundled 135M model finds needles there, not in
    # the essay (full cache, 2K tokens, 6 prompts: niah_single_1 6/6, niah_single_2 2/6).
    _niah("niah_single_3_noise", "noise", "the UUID of the one needle", False, 40,
          type_v="uuids"),
    _niah("niah_multikey_noise", "noise", "the number of one key; 2 needles with distinct keys",
          False, 16, num_keys=2),
    _niah("niah_multivalue_noise", "noise", "both numbers of one key (2 needles)", False, 32,
          num_values=2),
    _niah("niah_multiquery_noise", "noise", "the numbers of 2 keys (2 needles, both asked)",
          False, 32, num_keys=2, num_queries=2),
    TaskSpec("vt_1hop", "vt", "noise", "the 2 variables of a 1-hop assignment chain", False, 16,
             num_hops=1),
    TaskSpec("vt", "vt", "noise", "the 5 variables of a 4-hop assignment chain", True, 32,
             num_hops=4),
    TaskSpec("vt_easy", "vt", "noise", "the 3 variables of a 2-hop assignment chain", False, 24,
             num_hops=2),
    TaskSpec("cwe", "cwe", "word list", "the 10 most common words of a numbered list (30 times "
             "each, other words 3 times; short lengths lower the 30, see `cwe_frequencies`)",
             True, 64, num_cw=10),
    TaskSpec("cwe_easy", "cwe", "word list", "the 3 most common words of a numbered list (30 times "
             "each, other words 3 times)", False, 24, num_cw=3),
    TaskSpec("fwe", "fwe", "coded words", "the 3 most frequent coded words (Zipf, alpha 2)",
             True, 24),
)}


@dataclass(frozen=True)
class Case:
    """One prompt (``prompt_ids`` has exactly ``length`` tokens) and its references."""

    id: str
    task: str
    length: int
    context_len: int
    answers: list[str]
    max_tokens: int
    prompt_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Case:
        return cls(id=d["id"], task=d["task"], length=int(d["length"]),
                   context_len=int(d["context_len"]), answers=list(d["answers"]),
                   max_tokens=int(d["max_tokens"]), prompt_ids=[int(t) for t in d["prompt_ids"]])


def is_correct(completion: str, answers: list[str]) -> bool:
    """Right when every reference occurs in the completion, case-insensitively."""
    text = completion.lower()
    return all(a.lower() in text for a in answers)


def describe() -> str:
    """The tasks as a markdown table."""
    rows = ["| task | family | haystack | asks | difficulty | max_tokens |",
            "|---|---|---|---|---|---|"]
    for s in TASKS.values():
        rows.append(f"| `{s.name}` | {s.family.upper()} | {s.haystack} | {s.asks} | "
                    f"{'RULER standard' if s.standard else 'easier variant'} | {s.max_tokens} |")
    return "\n".join(rows)


@functools.lru_cache(maxsize=None)
def _prose() -> str:
    return filler_text("prose")


@functools.lru_cache(maxsize=None)
def word_list() -> tuple[str, ...]:
    """Lowercase alphabetic words of 4-10 letters of the prose filler, deduplicated, sorted
    (identifier parts such as ``os.path`` or ``ascii_letters`` are left out)."""
    found = re.findall(r"(?<![A-Za-z0-9_.])[a-z]{4,10}(?![A-Za-z0-9_])", _prose())
    return tuple(sorted(set(found)))


def cwe_frequencies(budget: int, cost: Callable[[int, int, int], int], num_cw: int,
                    pool: int) -> tuple[int, int, int]:
    """``(freq_cw, freq_ucw, n_uncommon)`` for a CWE list of at most ``budget`` tokens.

    ``cost(freq_cw, freq_ucw, n_uncommon)`` is the token count of such a list. RULER's 30/3 is
    kept when it fits with at least ``num_cw`` uncommon words; a shorter budget lowers freq_cw
    (down to ``CWE_MIN_RATIO * 3``), a budget beyond what the ``pool`` uncommon words fill at
    3 each raises freq_ucw (up to ``30 // CWE_MIN_RATIO``). ValueError outside that range."""
    min_u = min(num_cw, pool)
    f_ucw = CWE_FREQ_UCW
    for f_cw in range(CWE_FREQ_CW, CWE_MIN_RATIO * f_ucw - 1, -1):
        if cost(f_cw, f_ucw, min_u) <= budget:
            break
    else:
        raise ValueError(f"{budget} tokens cannot hold a CWE list of {num_cw} common words "
                         f"{CWE_MIN_RATIO * f_ucw} times each and {min_u} uncommon ones")
    if f_cw == CWE_FREQ_CW:
        while cost(f_cw, f_ucw, pool) < budget:
            if f_ucw + 1 > f_cw // CWE_MIN_RATIO:
                raise ValueError(f"{budget} tokens are more than a CWE list from the "
                                 f"{pool + num_cw}-word list can fill")
            f_ucw += 1
    lo, hi = min_u, pool                  # largest n_uncommon that fits: cost(lo) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(f_cw, f_ucw, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return f_cw, f_ucw, lo


class _Builder:
    """Token streams and encoders of one tokenizer, and the per-family prompt builders."""

    def __init__(self, tokenizer: Any, chat: bool = True) -> None:
        self.tok = tokenizer
        self.head, self.tail = (self.enc(p) for p in self._chat_parts()) if chat else ([], [])
        self.noise = self.enc(filler_text("passkey"))
        # The essay wraps at a paragraph break when a prompt needs more than the whole stream.
        self.essay = self.enc(_prose() + "\n\n")
        self.nl = self.enc("\n")
        ids = sorted(set(self.noise) | set(self.essay))
        self.text = dict(zip(ids, self.tok.batch_decode([[i] for i in ids])))
        t, e = self.text, self.essay
        self.paragraph_starts = [0] + [j for j in range(2, len(e))
                                       if (t[e[j - 2]] + t[e[j - 1]]).endswith("\n\n")]

    def enc(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def enc_many(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tok(texts, add_special_tokens=False).input_ids] if texts \
            else []

    def _chat_parts(self) -> tuple[str, str]:
        render = lambda: self.tok.apply_chat_template(  # noqa: E731
            [{"role": "user", "content": SPLIT}], add_generation_prompt=True, tokenize=False)
        text = render()
        if text != render() or text.count(SPLIT) != 1:
            raise ValueError("the chat template does not render deterministically around the "
                             "user message")
        today = datetime.date.today()
        for fmt in ("%d %b %Y", "%Y-%m-%d", "%B %d, %Y", "%d %B %Y"):
            if today.strftime(fmt) in text:
                raise ValueError(f"the chat template embeds today's date ({today.strftime(fmt)})"
                                 ": prompts would change from day to day")
        head, tail = text.split(SPLIT)
        return head, tail

    # --- haystack helpers ---

    @staticmethod
    def tile(stream: list[int], start: int, n: int) -> list[int]:
        out: list[int] = []
        pos = start % len(stream)
        while len(out) < n:
            take = min(n - len(out), len(stream) - pos)
            out += stream[pos:pos + take]
            pos = 0
        return out

    def sentence_ends(self, body: list[int]) -> list[int]:
        """Indices j of ``body`` right after a token ending with "." when the next token starts
        with whitespace (where a needle with a leading space can go)."""
        t = self.text
        return [j for j in range(1, len(body))
                if t[body[j - 1]].endswith(".") and t[body[j]][:1].isspace()]

    def pad(self, r: int) -> list[int]:
        """``r`` tokens closing a list-like haystack: a newline, then the noise filler."""
        return (self.nl + self.noise)[:r] if r > 0 else []

    @staticmethod
    def insert(body: list[int], at: list[int], pieces: list[list[int]]) -> list[int]:
        """``body`` with ``pieces[k]`` inserted at index ``at[k]`` (``at`` ascending, distinct)."""
        out: list[int] = []
        prev = 0
        for j, piece in zip(at, pieces):
            out += body[prev:j] + piece
            prev = j
        return out + body[prev:]

    def plant(self, rng: random.Random, body: list[int], pieces: list[list[int]],
              depth: float | None, task: str, length: int) -> list[int]:
        """Insert the pieces at sentence ends of ``body``: a single piece at ``depth``, several at
        distinct random sentence ends, in the given order."""
        ends = self.sentence_ends(body)
        if len(ends) < len(pieces):
            raise ValueError(f"{length} tokens are too few for {task}: the haystack has "
                             f"{len(ends)} sentence ends for {len(pieces)} insertions")
        if depth is not None and len(pieces) == 1:
            target = depth * len(body)
            at = [min(ends, key=lambda j: (abs(j - target), j))]
        else:
            at = sorted(rng.sample(ends, len(pieces)))
        return self.insert(body, at, pieces)

    # --- the families ---

    def niah(self, spec: TaskSpec, rng: random.Random, depth: float,
             length: int) -> tuple[str, Callable[[int], list[int]], str, str, list[str]]:
        words = word_list()
        prose = _prose()

        def value() -> str:
            if spec.type_v == "uuids":
                return str(uuid.UUID(int=rng.getrandbits(128), version=4))
            return str(rng.randrange(1_000_000, 10_000_000))

        def new_key(taken: set[str]) -> str:
            while True:
                a, b = rng.choice(words), rng.choice(words)
                key = f"{a}-{b}"
                if a != b and key not in taken and (spec.haystack != "essay" or key not in prose):
                    taken.add(key)
                    return key

        keys: set[str] = set()
        values: set[str] = set()

        def new_value() -> str:
            while True:
                v = value()
                if v not in values:
                    values.add(v)
                    return v

        n_keys = max(spec.num_keys, 1)
        key_list = [new_key(keys) for _ in range(n_keys)]
        queried = key_list[:spec.num_queries]
        needles: list[tuple[str, str]] = []  # (key, value)
        for k in key_list:
            for _ in range(spec.num_values if k in queried else 1):
                needles.append((k, new_value()))
        answers = [v for k, v in needles if k in queried]
        rng.shuffle(needles)
        if len(queried) == 1:
            query = queried[0]
        elif len(queried) == 2:
            query = f"{queried[0]} and {queried[1]}"
        else:
            query = ", ".join(queried[:-1]) + ", and " + queried[-1]
        fmt = dict(type_v=spec.type_v, query=query)
        line = lambda k, v: NIAH_NEEDLE.format(type_v=spec.type_v, key=k, value=v)  # noqa: E731

        def haystack(budget: int) -> list[int]:
            if spec.haystack == "needles":
                return self._needle_lines(rng, budget, line(*needles[0]), depth, keys, new_key,
                                          new_value, line, spec.name, length)
            pieces = self.enc_many([" " + line(k, v) for k, v in needles])
            n_body = budget - sum(map(len, pieces))
            if n_body < MIN_HAYSTACK:
                raise ValueError(f"{length} tokens are too few for {spec.name}")
            if spec.haystack == "noise":
                body = self.tile(self.noise, 0, n_body)
            else:
                body = self.tile(self.essay, rng.choice(self.paragraph_starts), n_body)
            return self.plant(rng, body, pieces, depth if len(pieces) == 1 else None,
                              spec.name, length)

        return (NIAH_INTRO.format(type_v=spec.type_v), haystack, NIAH_QUESTION.format(**fmt),
                NIAH_PREFIX.format(**fmt), answers)

    def _needle_lines(self, rng: random.Random, budget: int, query_line: str, depth: float,
                      keys: set[str], new_key: Callable[[set[str]], str],
                      new_value: Callable[[], str], line: Callable[[str, str], str], task: str,
                      length: int) -> list[int]:
        """niah_multikey_2's haystack: needle lines (distinct keys) joined by newlines, the
        queried one at ``depth``, as many as fit, then padded."""
        q = self.enc(query_line)
        used = len(q)
        lines: list[list[int]] = []
        while True:
            batch = self.enc_many([line(new_key(keys), new_value()) for _ in range(64)])
            full = False
            for ids in batch:
                if used + len(self.nl) + len(ids) > budget:
                    full = True
                    break
                lines.append(ids)
                used += len(self.nl) + len(ids)
            if full:
                break
        if len(lines) < MIN_DISTRACTORS:
            raise ValueError(f"{length} tokens are too few for {task}")
        lines.insert(min(int(depth * (len(lines) + 1)), len(lines)), q)
        out = list(lines[0])
        for ids in lines[1:]:
            out += self.nl + ids
        return out + self.pad(budget - len(out))

    def vt(self, spec: TaskSpec, rng: random.Random, depth: float,
           length: int) -> tuple[str, Callable[[int], list[int]], str, str, list[str]]:
        names: list[str] = []
        while len(names) < spec.num_hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10_000, 100_000))
        chain = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(spec.num_hops)]

        def haystack(budget: int) -> list[int]:
            pieces = self.enc_many([" " + s for s in chain])
            n_body = budget - sum(map(len, pieces))
            if n_body < MIN_HAYSTACK:
                raise ValueError(f"{length} tokens are too few for {spec.name}")
            return self.plant(rng, self.tile(self.noise, 0, n_body), pieces, None, spec.name,
                              length)

        return (VT_INTRO, haystack, VT_QUESTION.format(value=value),
                VT_PREFIX.format(num_v=len(names), value=value), names)

    def cwe(self, spec: TaskSpec, rng: random.Random, depth: float,
            length: int) -> tuple[str, Callable[[int], list[int]], str, str, list[str]]:
        order = rng.sample(word_list(), len(word_list()))
        common, pool = order[:spec.num_cw], order[spec.num_cw:]
        shuffle_seed = rng.getrandbits(64)

        def build(f_cw: int, f_ucw: int, n_u: int) -> list[int]:
            items = common * f_cw + pool[:n_u] * f_ucw
            random.Random(shuffle_seed).shuffle(items)
            texts = [f"{k + 1}. {w}" if k == 0 else f" {k + 1}. {w}" for k, w in enumerate(items)]
            return [t for ids in self.enc_many(texts) for t in ids]

        def haystack(budget: int) -> list[int]:
            f_cw, f_ucw, n_u = cwe_frequencies(
                budget, lambda a, b, c: len(build(a, b, c)), spec.num_cw, len(pool))
            ids = build(f_cw, f_ucw, n_u)
            return ids + self.pad(budget - len(ids))

        fmt = dict(num_cw=spec.num_cw)
        return CWE_INTRO, haystack, CWE_QUESTION.format(**fmt), CWE_PREFIX.format(**fmt), common

    def fwe(self, spec: TaskSpec, rng: random.Random, depth: float,
            length: int) -> tuple[str, Callable[[int], list[int]], str, str, list[str]]:
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < FWE_VOCAB:
            w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab = [FWE_DOTS] + vocab            # rank 1 is RULER's noise word "...."
        cum = list(itertools.accumulate(1 / r ** FWE_ALPHA for r in range(1, len(vocab) + 1)))
        costs = dict(zip(vocab, map(len, self.enc_many([" " + w for w in vocab]))))
        dots = self.enc(" " + FWE_DOTS)
        answers: list[str] = []  # filled by haystack(): the top 3 of the text it draws

        def haystack(budget: int) -> list[int]:
            if budget < 4 * MIN_HAYSTACK:
                raise ValueError(f"{length} tokens are too few for {spec.name}")
            for _ in range(100):
                words: list[str] = []
                used = 0
                full = False
                while not full:
                    for w in rng.choices(vocab, cum_weights=cum, k=256):
                        if used + costs[w] > budget:
                            full = True
                            break
                        words.append(w)
                        used += costs[w]
                top = Counter(w for w in words if w != FWE_DOTS).most_common(4)
                if len(top) == 4 and top[2][1] > top[3][1]:
                    answers[:] = [w for w, _ in top[:3]]
                    ids = [t for ids in self.enc_many([" " + w for w in words]) for t in ids]
                    r = budget - len(ids)     # padded with the noise word "...."
                    return ids + dots * (r // len(dots)) + self.pad(r % len(dots))
            raise ValueError(f"{length} tokens: no FWE text with a strict top 3 in 100 draws")

        # The intro's trailing space is the first word's leading space.
        return FWE_INTRO.rstrip(" "), haystack, FWE_QUESTION, FWE_PREFIX, answers


def build_cases(tokenizer: Any, tasks: list[str], lengths: list[int], per_task: int, *,
                seed: int = 0, chat: bool = True) -> list[Case]:
    """``per_task`` cases of every task at every length (task-major), token ids built with the
    (Hugging Face) ``tokenizer``; ValueError for an unknown task or a length too small for one.
    ``chat=False``: RULER's prompt as plain text, without the model's chat template (RULER's
    setting for base models; the bundled 135M model follows it better, see ``docs/accuracy.md``)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
    if per_task < 1:
        raise ValueError("per_task must be at least 1")
    b = _Builder(tokenizer, chat)
    cases = []
    for task in tasks:
        spec = TASKS[task]
        family = getattr(b, spec.family)
        for length in lengths:
            rng = random.Random(f"{seed}-{task}-{length}")
            for i in range(per_task):
                depth = (i + 0.5) / per_task
                intro, haystack, question, prefix, answers = family(spec, rng, depth, length)
                intro_ids, q_ids, p_ids = b.enc(intro), b.enc(question), b.enc(prefix)
                budget = length - len(b.head) - len(intro_ids) - len(q_ids) - len(b.tail) \
                    - len(p_ids)
                if budget < 1:
                    raise ValueError(f"{length} tokens are too few for {task}")
                hay = haystack(budget)
                assert len(hay) == budget, (task, length, len(hay), budget)
                ids = b.head + intro_ids + hay + q_ids + b.tail + p_ids
                assert len(ids) == length
                cases.append(Case(f"{task}-{length}-{i:03d}", task, length,
                                  len(b.head) + len(intro_ids) + len(hay), list(answers),
                                  spec.max_tokens, ids))
    return cases
