"""Sift's list filters: the CEL subset parsed, checked per RPC, and compiled to SQL."""

from __future__ import annotations

import sqlite3

import pytest

from daq_agent.server.filters import And, Column, Compare, FilterError, Not, Or, compile_sql, parse

COLUMNS = {
    "name": Column("name"),
    "client_key": Column("client_key", nullable=True),
    "n": Column("n", int),
    "flag": Column("flag", bool),
}
ROWS = [
    ("a", "k1", 1, 1),
    ("b", None, 2, 0),
    ("it's", "k3", 3, 1),
    ('say "hi"', "", 4, 0),
]


def _select(text: str) -> list[str]:
    """Names of ROWS the filter selects, through SQLite."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (name TEXT, client_key TEXT, n INTEGER, flag INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", ROWS)
    where, params = compile_sql(text, parse(text), COLUMNS)
    names = [r[0] for r in conn.execute(f"SELECT name FROM t WHERE {where} ORDER BY n", params)]
    conn.close()
    return names


def test_forms_sift_clients_send() -> None:
    """The exact forms sift_py and sift_stream send parse to the expected trees."""
    assert parse('client_key=="k"') == Compare("client_key", "==", ("k",), 0)
    assert parse("client_key == 'k'") == Compare("client_key", "==", ("k",), 0)
    assert parse("flow_name in ['readings','b']") == Compare(
        "flow_name", "in", ("readings", "b"), 0
    )
    assert parse('asset_id == \'x\' && name in ["a","b"]') == And(
        (
            Compare("asset_id", "==", ("x",), 0),
            Compare("name", "in", ("a", "b"), 19),
        )
    )
    assert parse("") is None
    assert parse("   ") is None


def test_precedence_grouping_and_negation() -> None:
    """`!` binds tighter than `&&`, which binds tighter than `||`; parentheses group."""
    a, b, c = (Compare(x, "==", (1,), p) for x, p in (("a", 0), ("b", 10), ("c", 20)))
    assert parse("a == 1 || b == 1 && c == 1") == Or((a, And((b, c))))
    grouped = parse("(a == 1 || b == 1) && c == 1")
    assert grouped == And(
        (
            Or((Compare("a", "==", (1,), 1), Compare("b", "==", (1,), 11))),
            Compare("c", "==", (1,), 22),
        )
    )
    assert parse("!a == 1") == Not(Compare("a", "==", (1,), 1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["a", "b", "it's", 'say "hi"']),
        ("name == 'a'", ["a"]),
        ('name == "it\'s"', ["it's"]),
        ("name == 'it\\'s'", ["it's"]),
        ('name == "say \\"hi\\""', ['say "hi"']),
        ("name == '\\u0061'", ["a"]),
        ("name != 'a'", ["b", "it's", 'say "hi"']),
        ("name in ['a', 'b',]", ["a", "b"]),
        ("name in []", []),
        ("client_key == ''", ["b", 'say "hi"']),
        ("client_key in ['k1', 'k3']", ["a", "it's"]),
        ("n == 2 || flag == true", ["a", "b", "it's"]),
        ("!(flag == true) && n != 4", ["b"]),
        ("name.contains('i')", ["it's", 'say "hi"']),
        ("name.startsWith('sa')", ['say "hi"']),
        ("name.endsWith('s')", ["it's"]),
        ("name.endsWith('')", ["a", "b", "it's", 'say "hi"']),
        ("n == -1", []),
    ],
)
def test_filters_select_the_right_rows(text: str, expected: list[str]) -> None:
    """Each form selects exactly the rows CEL's semantics say, in real SQLite."""
    assert _select(text) == expected


def test_a_long_in_list_is_one_parameter() -> None:
    """An `in` list of thousands of names (sift_stream lists every flow) stays one parameter."""
    names = [f"flow{i}" for i in range(40_000)] + ["b"]
    text = "name in [" + ",".join(f"'{n}'" for n in names) + "]"
    _, params = compile_sql(text, parse(text), COLUMNS)
    assert len(params) == 1
    assert _select(text) == ["b"]


@pytest.mark.parametrize(
    ("text", "position", "problem"),
    [
        ("name = 'a'", 5, "unexpected character '='"),
        ("name == 'a' ||", 14, "expected a field name, '!' or '(', found end of filter"),
        ("name == a", 8, "expected a string, integer, true or false, found 'a'"),
        ("name == 'a", 8, "unterminated string"),
        ("name == 'a' name", 12, "expected '&&', '||' or the end of the filter, found 'name'"),
        ("name in ['a' 'b']", 13, "expected ',' or ']', found 'b'"),
        ("(name == 'a'", 12, "expected ')', found end of filter"),
        ("name.matches('a')", 5, "expected contains or startsWith or endsWith, found 'matches'"),
        ("name == 1.5", 8, "only integer numbers are supported"),
        ("name == 'a\\q'", 10, "invalid escape \\q"),
        ("name > 'a'", 5, "unexpected character '>'"),
    ],
)
def test_syntax_errors_name_the_offset(text: str, position: int, problem: str) -> None:
    """A syntax error says what was expected and where."""
    with pytest.raises(FilterError) as info:
        parse(text)
    assert info.value.position == position
    assert info.value.problem == problem
    assert f"at offset {position}" in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("colour == 'red'", "cannot filter on 'colour' (supported: client_key, flag, n, name)"),
        ("n == 'x'", "'n' is compared with 'x'; it takes an integer"),
        ("flag == 1", "'flag' is compared with 1; it takes a boolean"),
        ("n.contains('1')", "contains() needs a string field, 'n' is not"),
    ],
)
def test_fields_and_kinds_are_checked(text: str, problem: str) -> None:
    """A field the RPC does not know, or a value of the wrong kind, is refused by name."""
    with pytest.raises(FilterError) as info:
        compile_sql(text, parse(text), COLUMNS)
    assert info.value.problem == problem
