"""The RULER-style task generator (``benchmarks.ruler``) with the real SmolLM2 tokenizer, no vLLM:
every prompt has exactly its length, the question starts at ``context_len``, and what the
references claim is checked in the decoded text itself (needles counted, the VT chain walked, CWE
and FWE frequencies recounted), not through the generator's helpers."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import ruler
from benchmarks.needle import PASSKEY_FILLER, filler_text

LENGTHS = [1024, 2048]
PER_TASK = 2
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for ([a-z]+-[a-z]+) is: "
                       r"([0-9a-f-]+)\.")
QUESTION_START = {"niah": "\nWhat are all the special magic ",
                  "vt": "\nQuestion: Find all variables", "cwe": "\nQuestion: What are the ",
                  "fwe": "\nQuestion: Do not provide any"}
INTRO_START = {"niah": "Some special magic ", "vt": "Memorize and track the chain(s)",
               "cwe": "Below is a numbered list of words.", "fwe": "Read the following coded text"}


@pytest.fixture(scope="module")
def tok(smollm2_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path))


@pytest.fixture(scope="module")
def cases(tok) -> list[ruler.Case]:
    return ruler.build_cases(tok, list(ruler.TASKS), LENGTHS, PER_TASK, seed=0)


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _parts(tok, case: ruler.Case) -> tuple[str, str]:
    """(haystack text: the context after the chat head and the intro line(s), rest of prompt)."""
    context = _decode(tok, case.prompt_ids[:case.context_len])
    head = context.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    intro = INTRO_START[ruler.TASKS[case.task].family]
    assert context[head:].startswith(intro), context[head:head + 80]
    if case.task == "fwe":
        hay = context.split("Find the three most frequently appeared coded words.", 1)[1]
    else:
        hay = context[head:].split("\n", 1)[1]
    return hay, _decode(tok, case.prompt_ids[case.context_len:])


def _query(rest: str) -> list[str]:
    q = re.match(r"\nWhat are all the special magic \w+ for (.+?) mentioned in the provided "
                 r"text\?", rest).group(1)
    return re.split(r", and |, | and ", q)


def test_tasks_cover_ruler_and_describe_lists_them() -> None:
    assert set(ruler.TASKS) == {
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
        "niah_multikey_1_easy", "niah_multikey_2", "niah_multivalue", "niah_multivalue_easy",
        "niah_multiquery", "niah_multiquery_easy", "vt", "vt_easy", "cwe", "cwe_easy", "fwe",
        # easier variants on the noise haystack
        "niah_single_3_noise", "niah_multikey_noise", "niah_multivalue_noise",
        "niah_multiquery_noise", "vt_1hop"}
    table = ruler.describe()
    assert table.count("\n") == len(ruler.TASKS) + 1
    for name, spec in ruler.TASKS.items():
        assert f"`{name}`" in table
        assert spec.standard == (not name.endswith(("_easy", "_noise", "_1hop")))


def test_chat_head_is_fixed_text(tok) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "@@SPLIT@@"}],
                                   add_generation_prompt=True, tokenize=False)
    head = text.split("@@SPLIT@@")[0]
    assert not re.search(r"\d", head)  # no date in SmolLM2's system prompt


def test_every_case_has_its_length_and_question_at_context_len(tok, cases) -> None:
    assert len(cases) == len(ruler.TASKS) * len(LENGTHS) * PER_TASK
    assert len({c.id for c in cases}) == len(cases)
    for c in cases:
        spec = ruler.TASKS[c.task]
        assert re.fullmatch(rf"{c.task}-{c.length}-\d{{3}}", c.id)
        assert len(c.prompt_ids) == c.length
        assert c.max_tokens == spec.max_tokens
        hay, rest = _parts(tok, c)
        assert rest.startswith(QUESTION_START[spec.family]), (c.id, rest[:60])
        assert rest.endswith((" are", " are:", "they are: "))
        assert "<|im_start|>assistant\n" in rest
        assert "Question" not in hay and "What are all" not in hay and "<|im" not in hay
        assert len(hay) > 1000, c.id
        assert ruler.Case.from_dict(c.to_dict()) == c


@pytest.fixture(scope="module")
def prose() -> str:
    return filler_text("prose")


def test_niah_needles_keys_and_values_are_in_the_context(tok, cases, prose) -> None:
    for c in (c for c in cases if c.task.startswith("niah")):
        spec = ruler.TASKS[c.task]
        hay, rest = _parts(tok, c)
        needles = NEEDLE_RE.findall(hay)
        assert {t for t, _, _ in needles} == {spec.type_v}
        query = _query(rest)
        assert len(query) == spec.num_queries and len(set(query)) == len(query)
        keys = [k for _, k, _ in needles]
        by_key: dict[str, list[str]] = {}
        for _, k, v in needles:
            by_key.setdefault(k, []).append(v)
        if c.task == "niah_multikey_2":
            assert len(keys) > 20 and len(set(keys)) == len(keys)   # distinct keys, one each
            assert hay.count("One of the special magic") == len(needles)
        else:
            assert len(set(keys)) == max(spec.num_keys, 1)
            assert len(needles) == max(spec.num_keys, 1) - 1 + spec.num_values
        for k in query:
            assert hay.count(f"for {k} is:") == spec.num_values
        assert sorted(c.answers) == sorted(v for k in query for v in by_key[k])
        for v in c.answers:
            assert hay.count(v) == 1                          # each value planted once
            if spec.type_v == "uuids":
                assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-"
                                    r"[0-9a-f]{12}", v)
            else:
                assert re.fullmatch(r"[1-9]\d{6}", v)
        if spec.haystack == "needles":
            assert all(line.startswith("One of the special magic") or
                       PASSKEY_FILLER.startswith(line) for line in hay.split("\n")), c.id
            continue
        for m in re.finditer("One of the special magic", hay):   # needles go at sentence ends
            assert hay[m.start() - 2:m.start()] == ". ", (c.id, hay[m.start() - 40:m.start()])
        # Without its needles, the haystack is a stretch of the filler, character for character.
        filler = PASSKEY_FILLER * 100 if spec.haystack == "noise" else (prose + "\n\n") * 2
        plain = re.sub(" " + NEEDLE_RE.pattern, "", hay)
        assert not re.search(r"\d", plain)                 # so no digit competes with a value
        if spec.haystack == "noise":
            assert filler.startswith(plain)
        else:
            assert plain in filler


def test_single_needle_depths_spread_over_the_cell(tok, cases) -> None:
    for task in ("niah_single_1", "niah_single_2"):
        for length in LENGTHS:
            cell = [c for c in cases if c.task == task and c.length == length]
            depths = []
            for c in cell:
                hay, _ = _parts(tok, c)
                depths.append(hay.index(c.answers[0]) / len(hay))
            assert depths[0] < 0.45 and depths[1] > 0.55, (task, length, depths)


def test_vt_chain_walks_to_the_answers(tok, cases) -> None:
    for c in (c for c in cases if c.task.startswith("vt")):
        hops = ruler.TASKS[c.task].num_hops
        hay, rest = _parts(tok, c)
        value = re.match(r"\nQuestion: Find all variables that are assigned the value (\d{5}) ",
                         rest).group(1)
        assert f"{hops + 1} variables are assgined the value {value}, they are: " in rest
        first = re.findall(rf" VAR ([A-Z]{{5}}) = {value}\. ", hay)
        assert len(first) == 1
        names = first
        pos = hay.index(f"VAR {names[0]} = {value}.")
        while m := re.search(rf" VAR ([A-Z]{{5}}) = VAR {names[-1]}\. ", hay):
            assert m.start() > pos                             # the chain goes forward
            pos = m.start()
            names.append(m.group(1))
        assert names == c.answers and len(set(names)) == hops + 1
        assert len(re.findall(r"VAR [A-Z]{5} = ", hay)) == hops + 1
        stripped = re.sub(r" VAR [A-Z]{5} = (VAR [A-Z]{5}|\d{5})\.", "", hay)
        assert not re.search(r"VAR|\d", stripped)


def test_cwe_common_words_beat_every_other_word(tok, cases) -> None:
    for c in (c for c in cases if c.task.startswith("cwe")):
        num_cw = ruler.TASKS[c.task].num_cw
        hay, rest = _parts(tok, c)
        assert f"the {num_cw} most common words" in rest and f"The top {num_cw} words" in rest
        items = re.findall(r"(\d+)\. ([a-z]+)", hay)
        assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
        counts = Counter(w for _, w in items)
        assert len(c.answers) == num_cw and set(c.answers) <= set(counts)
        common = {counts[w] for w in c.answers}
        others = [n for w, n in counts.items() if w not in c.answers]
        assert len(common) == 1 and others                   # every common word equally often
        assert min(common) >= 3 * max(others), (c.id, common, set(others))
        assert set(others) == {3}
        if c.task == "cwe_easy" or c.length >= 2048:
            assert common == {30}                            # RULER's frequency when it fits


def test_fwe_answers_are_the_recounted_top_three(tok, cases) -> None:
    for c in (c for c in cases if c.task == "fwe"):
        hay, _ = _parts(tok, c)
        words = hay.split()
        assert all(re.fullmatch(r"[a-z]{3,5}|\.\.\.\.", w) for w in words)
        assert words.count("....") > len(words) / 3           # rank 1 is the noise word
        top = Counter(w for w in words if w != "....").most_common(4)
        assert sorted(c.answers) == sorted(w for w, _ in top[:3])
        assert top[2][1] > top[3][1]


def test_same_seed_same_cases_other_seed_other_cases(tok, cases) -> None:
    tasks = ["niah_single_1", "niah_multikey_2", "vt", "cwe_easy", "fwe"]  # in TASKS' order
    again = ruler.build_cases(tok, tasks, [1024], PER_TASK, seed=0)
    assert again == [c for c in cases if c.task in tasks and c.length == 1024]
    other = ruler.build_cases(tok, tasks, [1024], PER_TASK, seed=1)
    for a, b in zip(again, other):
        assert a.id == b.id and a.prompt_ids != b.prompt_ids and a.answers != b.answers


def test_other_tasks_and_lengths_do_not_change_a_cell(tok, cases) -> None:
    alone = ruler.build_cases(tok, ["niah_multiquery"], [2048], PER_TASK)
    assert alone == [c for c in cases if c.task == "niah_multiquery" and c.length == 2048]


def test_too_short_lengths_and_unknown_tasks_are_refused(tok) -> None:
    for task in ruler.TASKS:
        with pytest.raises(ValueError):
            ruler.build_cases(tok, [task], [96], 1)
    with pytest.raises(ValueError, match="cannot hold a CWE list"):
        ruler.build_cases(tok, ["cwe"], [512], 1)
    with pytest.raises(ValueError, match="unknown"):
        ruler.build_cases(tok, ["niah_single_9"], [1024], 1)


def test_is_correct_needs_every_reference_case_insensitively() -> None:
    assert ruler.is_correct(" 1234567.", ["1234567"])
    assert ruler.is_correct("They are: ABCDE, fghij and KLMNO", ["abcde", "FGHIJ", "klmno"])
    assert not ruler.is_correct("They are: ABCDE and KLMNO", ["abcde", "fghij", "klmno"])
    assert not ruler.is_correct("123456", ["1234567"])
    assert ruler.is_correct("x 1234567 y", ["1234567", "1234567"])
