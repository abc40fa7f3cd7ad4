"""The A1111 emphasis parser."""

from __future__ import annotations

import pytest

from webui.engine.prompt_parser import BREAK_FRAGMENT, is_break, parse_prompt_attention

B = BREAK_FRAGMENT

CASES: list[tuple[str, list[tuple[str, float]]]] = [
    # plain text and the empty prompt
    ("", [("", 1.0)]),
    ("a cat", [("a cat", 1.0)]),
    ("   ", [("   ", 1.0)]),
    # round / square brackets and nesting
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("(((cat)))", [("cat", 1.1 * 1.1 * 1.1)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("[[cat]]", [("cat", 1 / 1.1 / 1.1)]),
    ("([cat])", [("cat", 1 / 1.1 * 1.1)]),
    ("a (b [c] d) e", [("a ", 1.0), ("b ", 1.1), ("c", 1.1 / 1.1), (" d", 1.1), (" e", 1.0)]),
    # explicit weights: decimals, integers, negatives, spaces, nesting
    ("(cat:1.3)", [("cat", 1.3)]),
    ("(cat:2)", [("cat", 2.0)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("(cat:-0.7)", [("cat", -0.7)]),
    ("(cat: 1.25 )", [("cat", 1.25)]),
    ("((cat:1.5))", [("cat", 1.5 * 1.1)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    ("[(cat:1.5)]", [("cat", 1.5 / 1.1)]),
    ("a (cat:1.2) sat", [("a ", 1.0), ("cat", 1.2), (" sat", 1.0)]),
    # a colon that is not a weight stays literal
    ("x:y", [("x:y", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(cat:1.2.3)", [("cat:1.2.3", 1.1)]),
    # escapes
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\]", [("[cat]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(\(cat\))", [("(cat)", 1.1)]),
    (r"C:\path", [("C:\\path", 1.0)]),
    # unbalanced: an open group weights the rest, a stray closer is literal
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),
    ("a [cat", [("a ", 1.0), ("cat", 1 / 1.1)]),
    ("a ((cat) dog", [("a ", 1.0), ("cat", 1.21), (" dog", 1.1)]),
    ("a ) b ]", [("a ) b ]", 1.0)]),
    ("a :1.3) b", [("a :1.3) b", 1.0)]),
    ("(a] b)", [("a] b", 1.1)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), B, ("b", 1.0)]),
    ("BREAK", [B]),
    ("a BREAK BREAK b", [("a", 1.0), B, B, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), B, ("b", 1.1)]),
    ("(a BREAK b:1.5)", [("a", 1.5), B, ("b", 1.5)]),
    ("BREAKFAST break a_BREAK", [("BREAKFAST break a_BREAK", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), B, (",b", 1.0)]),
    # merging of equal neighbours
    ("(a)(b)", [("ab", 1.1)]),
    ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    ("a () b", [("a  b", 1.0)]),
    ("(a:1)b", [("ab", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    result = parse_prompt_attention(text)
    assert [t for t, _ in result] == [t for t, _ in expected]
    assert [w for _, w in result] == pytest.approx([w for _, w in expected])


def test_break_marker_is_recognised_and_plain_fragments_are_not() -> None:
    fragments = parse_prompt_attention("cat BREAK (dog:-1)")
    assert [is_break(f) for f in fragments] == [False, True, False]
    assert fragments[2] == ("dog", -1.0)


def test_weights_are_floats() -> None:
    assert all(isinstance(w, float) for _, w in parse_prompt_attention("(a:2) [b] c"))
