"""Every text parser a request reaches runs in time linear in its input, however hostile.

Each parser gets inputs of 10k, 100k and 1M characters built to trip backtracking patterns and
nested loops (long runs of spaces, ``"<a:" * n``, deep brackets, ``"a: " + "b " * n``...). The
check is a ratio, never a wall-clock bound: ten times the input may take at most
:data:`MAX_RATIO` times as long (a quadratic parser takes about 100 times as long). Each time is
the best of three runs (fewer for a run over a second) with the garbage collector off, as
``timeit`` measures; a time below :data:`FLOOR_S` counts as that floor, so timer noise on tiny
inputs cannot fail a check, and a measurement that misses is repeated (a quadratic path misses
every time).

Paths through the tokenizer (textual-inversion lookup, long words) use 1k, 10k and 100k
characters: they are linear too, but a 1M-character prompt spends seconds in the tokenizer and
the chunking loop. Beside the timings, the rewritten parsers are compared with the patterns they
replace on thousands of short random strings.
"""

from __future__ import annotations

import gc
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from webui.engine import prompt_parser
from webui.engine.clip_tokenizer import MAX_WORD_CHARS, clip_tokenizer, split_long_words
from webui.engine.embeddings import EmbeddingLibrary
from webui.engine.lora import EXTRA_NETWORK_TAG, parse_lora_tags, strip_network_tags
from webui.engine.prompt_parser import BREAK_FRAGMENT, parse_prompt_attention, split_breaks
from webui.engine.text import chunk_prompt
from webui.metadata import _parse_pairs, parse_infotext

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

SIZES = (10_000, 100_000, 1_000_000)
TOKENIZER_SIZES = (1_000, 10_000, 100_000)
MAX_RATIO = 25.0
FLOOR_S = 2e-3
ATTEMPTS = 3
RUNS = 3
LONG_S = 1.0

# The patterns the linear parsers replace: the reference their results are compared with.
OLD_BREAK = re.compile(r"\s*\bBREAK\b\s*")
OLD_PAIR = re.compile(
    r"""\s*
    (?P<key>\w[\w \-/]+)
    :\s*
    (?P<value>"(?:\\.|[^\\"])+"|[^,]*)
    (?:,|$)""",
    re.VERBOSE,
)


def best_time(func: Callable[[Any], object], arg: Any) -> float:
    """The best of three runs, or of fewer once :data:`LONG_S` has been spent (a run that long is
    timed well enough, and the suite stays fast)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        best, spent = float("inf"), 0.0
        for _ in range(RUNS):
            start = time.perf_counter()
            func(arg)
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
            if spent >= LONG_S:
                break
        return best
    finally:
        if enabled:
            gc.enable()


def assert_linear(
    func: Callable[[Any], object], make: Callable[[int], Any], sizes: tuple[int, ...] = SIZES
) -> None:
    """``func(make(n))`` takes at most :data:`MAX_RATIO` times longer for each tenfold ``n``."""
    inputs = [make(n) for n in sizes]
    times: list[float] = []
    for _ in range(ATTEMPTS):
        times = [best_time(func, arg) for arg in inputs]
        ratios = [big / max(small, FLOOR_S) for small, big in zip(times, times[1:], strict=False)]
        if all(ratio <= MAX_RATIO for ratio in ratios):
            return
    shown = ", ".join(f"{n:,}: {t * 1000:.1f} ms" for n, t in zip(sizes, times, strict=True))
    pytest.fail(f"{getattr(func, '__name__', func)} is not linear: {shown}")


def repeat(unit: str, n: int) -> str:
    """``unit`` repeated to exactly ``n`` characters."""
    return (unit * (n // len(unit) + 1))[:n]


# -- the emphasis parser ---------------------------------------------------------------------------

PROMPTS: dict[str, Callable[[int], str]] = {
    "spaces": lambda n: " " * n,
    "BREAK": lambda n: repeat("BREAK ", n),
    "spaces around BREAK": lambda n: " " * (n // 2) + "BREAK" + "\t" * (n // 2),
    "open brackets": lambda n: repeat("([", n),
    "nested and never closed": lambda n: repeat("(a", n),
    "nested, closed with weights": lambda n: "[(a" * (n // 10) + ":1.1)]" * (n // 10),
    "colon then spaces": lambda n: "(a:" + " " * n,
    "colon then digits": lambda n: "(a:" + "1" * n,
    "colons and digits": lambda n: repeat(":1", n),
    "backslashes": lambda n: "\\" * n,
    "a: b b b": lambda n: "a: " + "b " * (n // 2),
}


@pytest.mark.parametrize("make", PROMPTS.values(), ids=PROMPTS.keys())
def test_the_emphasis_parser_is_linear(make: Callable[[int], str]) -> None:
    assert_linear(parse_prompt_attention, make)


def test_hostile_prompts_still_parse_right() -> None:
    n = 100_000
    assert parse_prompt_attention(" " * n) == [(" " * n, 1.0)]
    assert parse_prompt_attention("BREAK " * (n // 6)) == [BREAK_FRAGMENT] * (n // 6)
    assert parse_prompt_attention(" " * n + "BREAK" + " " * n + "x") == [BREAK_FRAGMENT, ("x", 1.0)]
    assert parse_prompt_attention("(" * n) == [("", 1.0)]
    assert parse_prompt_attention("\\" * n) == [("\\" * (n // 2), 1.0)]
    assert parse_prompt_attention(":" + " " * n) == [(":" + " " * n, 1.0)]
    ((text, weight),) = parse_prompt_attention("(a:" + " " * n + "2" + " " * n + ")")
    assert (text, weight) == ("a", 2.0)


def test_deep_nesting_gives_the_weights_of_its_depth() -> None:
    """``"(a" * 60 + ")" * 60`` is past the step-by-step budget: the weights come from the group
    tree, and fragment k is inside k + 1 groups."""
    depth = 60
    assert depth * (depth + 1) // 2 > prompt_parser.EXACT_WORK_PER_CHAR * 3 * depth
    result = parse_prompt_attention("(a" * depth + ")" * depth)
    assert [text for text, _ in result] == ["a"] * depth
    assert [weight for _, weight in result] == pytest.approx([1.1 ** (k + 1) for k in range(depth)])
    mixed = parse_prompt_attention("[(x" * depth + ":2)]" * depth)
    assert [weight for _, weight in mixed] == pytest.approx([(2 / 1.1) ** (k + 1) for k in range(depth)])


def per_character(fragments: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Each character with its weight, the break marker as itself: the same for two fragment lists
    that differ only in which neighbours of (nearly) equal weight were merged."""
    out: list[tuple[str, float]] = []
    for text, weight in fragments:
        if (text, weight) == BREAK_FRAGMENT:
            out.append(BREAK_FRAGMENT)
        else:
            out += [(char, weight) for char in text]
    return out


def test_group_tree_weights_equal_the_step_by_step_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    alphabet = ["a", "b", " ", "(", ")", "[", "]", ":", "1.5", ":0.5)", ":-2)", "\\(", " BREAK ", "\\"]
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(2000)]
    exact = [parse_prompt_attention(p) for p in prompts]
    monkeypatch.setattr(prompt_parser, "EXACT_WORK_PER_CHAR", 0)
    for prompt, reference in zip(prompts, exact, strict=True):
        tree = per_character(parse_prompt_attention(prompt))
        expected = per_character(reference)
        assert [c for c, _ in tree] == [c for c, _ in expected], prompt
        assert [w for _, w in tree] == pytest.approx([w for _, w in expected], rel=1e-12), prompt


def test_break_splitting_equals_the_old_pattern() -> None:
    rng = random.Random(1)
    alphabet = ["BREAK", "B", "a", "_", " ", "\t", "\n", "\u00a0", "\u3000", ",", "1", "é"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert split_breaks(text) == OLD_BREAK.split(text), repr(text)


# -- extra-network tags ----------------------------------------------------------------------------

TAGS: dict[str, Callable[[int], str]] = {
    "'<a:' without '>'": lambda n: repeat("<a:", n),
    "'<a:' around one '>'": lambda n: repeat("<a:", n // 2) + ">" + repeat("<a:", n // 2),
    "empty tags": lambda n: repeat("<a:>", n),
    "a long name": lambda n: "<" + "a" * n + ">",
    "openers": lambda n: "<" * n + ">",
    "many LoRA tags": lambda n: repeat("<lora:x:1> ", n),
    "a long weight list": lambda n: "<lora:x:" + repeat("1:", n) + ">",
}


@pytest.mark.parametrize("make", TAGS.values(), ids=TAGS.keys())
def test_tag_stripping_is_linear(make: Callable[[int], str]) -> None:
    assert_linear(strip_network_tags, make)


def test_tag_parsing_is_linear() -> None:
    assert_linear(parse_lora_tags, lambda n: repeat("<a:", n))
    text = "<a:" * 100_000
    assert parse_lora_tags(text) == (text, [])
    text, tags = parse_lora_tags("<lora:x:0.5> " * 10_000)
    assert text == " " * 10_000 and len(tags) == 10_000 and tags[0].te_weight == 0.5


def test_tags_are_found_as_the_old_pattern_found_them() -> None:
    rng = random.Random(2)
    alphabet = ["<", ">", ":", "a", "lora", " ", "\n", "_", "1", "="]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert strip_network_tags(text) == EXTRA_NETWORK_TAG.sub("", text), repr(text)


# -- infotext --------------------------------------------------------------------------------------

INFOTEXTS: dict[str, Callable[[int], str]] = {
    "spaces": lambda n: " " * n,
    "tabs": lambda n: "\t" * n,
    "a: b b b": lambda n: "a: " + "b " * (n // 2),
    "key characters, no colon": lambda n: repeat("ab -/", n),
    "one-letter keys": lambda n: repeat("a:", n),
    "commas": lambda n: "," * n,
    "unclosed strings": lambda n: repeat('ab: "x, ', n),
    "escapes in an unclosed string": lambda n: 'ab: "' + repeat("\\a", n),
    "a long string": lambda n: 'ab: "' + "x" * n + '"',
    "many pairs": lambda n: repeat("Steps: 20, ", n),
    "many lines": lambda n: repeat("a b\n", n),
}


@pytest.mark.parametrize("make", INFOTEXTS.values(), ids=INFOTEXTS.keys())
def test_the_infotext_parser_is_linear(make: Callable[[int], str]) -> None:
    assert_linear(parse_infotext, make)


def test_hostile_infotexts_still_parse_right() -> None:
    n = 100_000
    parsed = parse_infotext("a: " + "b " * n)
    assert parsed["Prompt"] == ("a: " + "b " * n).strip() and len(parsed) == 2
    parsed = parse_infotext("cat\n" + "Steps: 20, " * (n // 11) + "Seed: 3")
    assert (parsed["Prompt"], parsed["Steps"], parsed["Seed"]) == ("cat", "20", "3")
    value = "x, " * n
    parsed = parse_infotext(f'cat\nSteps: 20, Seed: 1, Note: "{value}"')
    assert parsed["Note"] == value


def test_pairs_equal_the_old_pattern() -> None:
    """The hand-written scanner finds exactly the pairs the old regular expression found."""
    rng = random.Random(3)
    for alphabet in ('ab :,"\\-/ 1x', 'a:, "\\\t_é\u00a0', 'ab: ,"'):
        for _ in range(4000):
            line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
            expected = [(m.group("key"), m.group("value")) for m in OLD_PAIR.finditer(line)]
            assert _parse_pairs(line) == expected, repr(line)


# -- the tokenizer and textual-inversion names -----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return clip_tokenizer()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingLibrary:
    folder: Path = tmp_path_factory.mktemp("embeddings")
    for index, name in enumerate(("inkstyle", "ink", "inkstyle2", "easynegative")):
        tensor = torch.randn(2, 8, generator=torch.Generator().manual_seed(index))
        save_file({"emb_params": tensor}, str(folder / f"{name}.safetensors"))
    return EmbeddingLibrary.from_folder(folder)


def test_long_words_are_cut_linearly_and_only_when_long() -> None:
    assert_linear(split_long_words, lambda n: "a" * n)
    assert_linear(split_long_words, lambda n: repeat("a" * (MAX_WORD_CHARS - 1) + " ", n))
    normal = "a photo of " + "x" * (MAX_WORD_CHARS - 1) + ", (best:1.2) BREAK\tdetail\n"
    assert split_long_words(normal) == normal
    cut = split_long_words("b " + "y" * (2 * MAX_WORD_CHARS + 5) + "\tz")
    assert cut == "b " + "y" * MAX_WORD_CHARS + " " + "y" * MAX_WORD_CHARS + " yyyyy\tz"


def test_a_huge_word_is_tokenized_in_linear_time(tokenizer: Any) -> None:
    for unit in ("a", "qxzj", "\U0001f600", "!?#"):
        assert_linear(
            lambda text: chunk_prompt(tokenizer, text, 75), lambda n, u=unit: repeat(u, n), TOKENIZER_SIZES
        )
    word = "qxzj" * 200  # 800 characters: tokenized as its three pieces
    pieces = [word[i : i + MAX_WORD_CHARS] for i in range(0, len(word), MAX_WORD_CHARS)]
    tokens = [t for chunk in chunk_prompt(tokenizer, word, 75) for t in chunk.tokens]
    expected = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    assert tokens == [t for ids in expected for t in ids]


def test_embedding_names_are_found_in_linear_time(tokenizer: Any, library: EmbeddingLibrary) -> None:
    def chunks(text: str) -> list[Any]:
        return chunk_prompt(tokenizer, text, 75, library.matcher(tokenizer, [8], 0))

    for unit in ("inkstyle ", "ink inkstyle2 ", "easynegative,"):
        assert_linear(chunks, lambda n, u=unit: repeat(u, n), TOKENIZER_SIZES)
    fresh = EmbeddingLibrary(library.files)
    result = chunk_prompt(tokenizer, "inkstyle " * 1000, 75, fresh.matcher(tokenizer, [8], 0))
    assert sum(len(chunk.fixes) for chunk in result) == 1000
    assert set(fresh.used) == {"inkstyle"}


def test_the_name_lookup_alone_is_linear(tokenizer: Any, library: EmbeddingLibrary) -> None:
    matcher = library.matcher(tokenizer, [8], 0)
    assert matcher is not None
    (ink,) = tokenizer(["inkstyle"], add_special_tokens=False)["input_ids"]

    def scan(tokens: list[int]) -> int:
        found, position = 0, 0
        while position < len(tokens):
            match = matcher.match(tokens, position)
            found += match is not None
            position += match[2] if match is not None else 1
        return found

    assert_linear(scan, lambda n: (list(ink) * (n // len(ink) + 1))[:n])
    assert scan(list(ink) * 1000) == 1000
