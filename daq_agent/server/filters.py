r"""The ``filter`` of Sift's List* requests: the subset of CEL that Sift's clients send, parsed and
compiled to SQL.

Grammar (CEL's precedence: ``!`` binds tightest, then ``&&``, then ``||``)::

    expr       := and ( "||" and )*
    and        := unary ( "&&" unary )*
    unary      := "!" unary | "(" expr ")" | comparison
    comparison := field ( "==" | "!=" ) literal
                | field "in" "[" [ literal ( "," literal )* [","] ] "]"
                | field "." ( "contains" | "startsWith" | "endsWith" ) "(" string ")"
    literal    := string | integer | "true" | "false"
    string     := '...' | "..."   (backslash escapes: \\ \' \" \n \r \t \uXXXX)

Forms Sift's clients send: ``client_key=="k"`` and ``name=="r"`` (sift_py), ``client_key == 'k'``
and ``flow_name in ['a','b']`` (sift_stream), ``asset_id == 'x' && name in ["a","b"]`` (sift_py's
rules).

:func:`parse` turns text into a tree (syntax errors name their offset); :func:`compile_sql` checks
the fields against what one RPC supports and returns a WHERE clause with its parameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from daq_agent.core.errors import DaqError

__all__ = [
    "MAX_COMPARISONS",
    "MAX_DEPTH",
    "And",
    "Column",
    "Compare",
    "FilterError",
    "Node",
    "Not",
    "Or",
    "compile_sql",
    "parse",
]

Scalar = str | int | bool
Op = Literal["==", "!=", "in", "contains", "startsWith", "endsWith"]
_FUNCTIONS = ("contains", "startsWith", "endsWith")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t", "`": "`"}
# An ``in`` list longer than this is passed as one JSON parameter (SQLite caps the number of
# parameters of a statement; sift_stream lists every flow name of its config).
_INLINE_IN = 64


MAX_COMPARISONS = 100
"""Comparisons a filter may have (SQLite refuses very deep expressions)."""
MAX_DEPTH = 32
"""How deep a filter may nest ``!`` and parentheses."""


_SHOWN = 200  # characters of a filter an error quotes (the status must fit in a gRPC trailer)


def _excerpt(text: str, position: int) -> str:
    """The filter as an error quotes it: whole if short, else the part around ``position``."""
    if len(text) <= _SHOWN:
        return repr(text)
    start = max(0, position - _SHOWN // 2)
    end = start + _SHOWN
    before = "..." if start else ""
    after = "..." if end < len(text) else ""
    return f"{before}{text[start:end]!r}{after} (of {len(text)} characters)"


class FilterError(DaqError):
    """A filter that cannot be parsed, or names a field or operation the RPC does not support.

    Attributes:
        position: 0-based offset in the filter text where the problem is.
    """

    def __init__(self, text: str, position: int, problem: str) -> None:
        super().__init__(
            f"invalid filter {_excerpt(text, position)} at offset {position}: {problem}"
        )
        self.position = position
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Compare:
    """``field <op> value(s)``; ``values`` has one element except for ``in``."""

    field: str
    op: Op
    values: tuple[Scalar, ...]
    position: int
    """Offset of the field name in the text."""


@dataclass(frozen=True, slots=True)
class And:
    """All terms hold."""

    terms: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """At least one term holds."""

    terms: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """The term does not hold."""

    term: Node


Node = Compare | And | Or | Not


@dataclass(frozen=True, slots=True)
class Column:
    """A filterable field of one RPC: its SQL expression and value kind."""

    sql: str
    kind: type[str] | type[int] | type[bool] = str
    nullable: bool = False
    """NULL in the table reads as "" (client keys)."""


# -- tokens ------------------------------------------------------------------------------------

TokenKind = Literal["ident", "string", "int", "op", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    value: str | int
    position: int


_OPERATORS = ("==", "!=", "&&", "||", "!", "(", ")", "[", "]", ",", ".")


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch.isalpha() or ch == "_":
            start = i
            while i < n and (text[i].isalnum() or text[i] == "_"):
                i += 1
            out.append(_Token("ident", text[start:i], start))
        elif ch.isdigit() or (ch == "-" and i + 1 < n and text[i + 1].isdigit()):
            start = i
            i += 1
            while i < n and text[i].isdigit():
                i += 1
            if i < n and (text[i].isalpha() or text[i] == "."):
                raise FilterError(text, start, "only integer numbers are supported")
            out.append(_Token("int", int(text[start:i]), start))
        elif ch in "'\"":
            start = i
            value, i = _string(text, i)
            out.append(_Token("string", value, start))
        else:
            for op in _OPERATORS:
                if text.startswith(op, i):
                    out.append(_Token("op", op, i))
                    i += len(op)
                    break
            else:
                raise FilterError(text, i, f"unexpected character {ch!r}")
    out.append(_Token("end", "", n))
    return out


def _string(text: str, start: int) -> tuple[str, int]:
    """A quoted string literal at ``start``: (value, offset after the closing quote)."""
    quote = text[start]
    chars: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == quote:
            return "".join(chars), i + 1
        if ch == "\\":
            if i + 1 >= n:
                break
            esc = text[i + 1]
            if esc in _ESCAPES:
                chars.append(_ESCAPES[esc])
                i += 2
            elif esc == "u" and i + 6 <= n:
                digits = text[i + 2 : i + 6]
                try:
                    chars.append(chr(int(digits, 16)))
                except ValueError:
                    raise FilterError(text, i, f"invalid escape \\u{digits}") from None
                i += 6
            else:
                raise FilterError(text, i, f"invalid escape \\{esc}")
        else:
            chars.append(ch)
            i += 1
    raise FilterError(text, start, "unterminated string")


# -- parser ------------------------------------------------------------------------------------


class _Parser:
    __slots__ = ("_comparisons", "_depth", "_i", "_text", "_tokens")

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _tokens(text)
        self._i = 0
        self._depth = 0
        self._comparisons = 0

    def _peek(self) -> _Token:
        return self._tokens[self._i]

    def _next(self) -> _Token:
        token = self._tokens[self._i]
        self._i += 1
        return token

    def _error(self, token: _Token, expected: str) -> FilterError:
        found = "end of filter" if token.kind == "end" else repr(token.value)
        return FilterError(self._text, token.position, f"expected {expected}, found {found}")

    def _expect_op(self, op: str) -> _Token:
        token = self._next()
        if token.kind != "op" or token.value != op:
            raise self._error(token, repr(op))
        return token

    def _is_op(self, op: str) -> bool:
        token = self._peek()
        return token.kind == "op" and token.value == op

    def parse(self) -> Node:
        node = self._or()
        token = self._peek()
        if token.kind != "end":
            raise self._error(token, "'&&', '||' or the end of the filter")
        return node

    def _or(self) -> Node:
        return self._joined("||", self._and, Or)

    def _and(self) -> Node:
        return self._joined("&&", self._unary, And)

    def _joined(
        self, op: str, term: Callable[[], Node], node: Callable[[tuple[Node, ...]], Node]
    ) -> Node:
        """One ``term``, or several joined by ``op`` as one ``node``."""
        terms = [term()]
        while self._is_op(op):
            self._next()
            terms.append(term())
        return terms[0] if len(terms) == 1 else node(tuple(terms))

    def _unary(self) -> Node:
        if not self._is_op("!") and not self._is_op("("):
            return self._comparison()
        token = self._next()
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise FilterError(
                self._text, token.position, f"nested deeper than {MAX_DEPTH} '!' or '('"
            )
        if token.value == "!":
            node: Node = Not(self._unary())
        else:
            node = self._or()
            self._expect_op(")")
        self._depth -= 1
        return node

    def _comparison(self) -> Node:
        field = self._next()
        self._comparisons += 1
        if self._comparisons > MAX_COMPARISONS:
            raise FilterError(
                self._text, field.position, f"more than {MAX_COMPARISONS} comparisons"
            )
        if field.kind != "ident" or field.value in ("in", "true", "false"):
            raise self._error(field, "a field name, '!' or '('")
        name = str(field.value)
        token = self._next()
        if token.kind == "op" and token.value in ("==", "!="):
            op: Op = "==" if token.value == "==" else "!="
            return Compare(name, op, (self._literal(),), field.position)
        if token.kind == "ident" and token.value == "in":
            return Compare(name, "in", self._list(), field.position)
        if token.kind == "op" and token.value == ".":
            function = self._next()
            if function.kind != "ident" or function.value not in _FUNCTIONS:
                raise self._error(function, " or ".join(_FUNCTIONS))
            self._expect_op("(")
            argument = self._next()
            if argument.kind != "string":
                raise self._error(argument, "a string")
            self._expect_op(")")
            fn: Op = function.value  # type: ignore[assignment]
            return Compare(name, fn, (str(argument.value),), field.position)
        raise self._error(token, "'==', '!=', 'in' or '.'")

    def _literal(self) -> Scalar:
        token = self._next()
        if token.kind in ("string", "int"):
            return token.value
        if token.kind == "ident" and token.value in ("true", "false"):
            return token.value == "true"
        raise self._error(token, "a string, integer, true or false")

    def _list(self) -> tuple[Scalar, ...]:
        self._expect_op("[")
        values: list[Scalar] = []
        while not self._is_op("]"):
            values.append(self._literal())
            if self._is_op(","):
                self._next()
            elif not self._is_op("]"):
                raise self._error(self._peek(), "',' or ']'")
        self._next()
        return tuple(values)


def parse(text: str) -> Node | None:
    """Parse a filter; None for an empty (all-matching) one.

    Raises:
        FilterError: a syntax error, naming its offset.
    """
    if not text.strip():
        return None
    return _Parser(text).parse()


# -- SQL ---------------------------------------------------------------------------------------


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean"}[kind]


def compile_sql(
    text: str, node: Node | None, columns: Mapping[str, Column]
) -> tuple[str, list[object]]:
    """A WHERE clause (``"1"`` for no filter) and its parameters.

    Args:
        text: the filter text (for error messages).
        node: what :func:`parse` returned for it.
        columns: the fields this RPC can filter on.

    Raises:
        FilterError: a field not in ``columns``, a value of the wrong kind, or a string function on
            a field that is not a string.
    """
    if node is None:
        return "1", []
    params: list[object] = []
    return _sql(text, node, columns, params), params


def _sql(text: str, node: Node, columns: Mapping[str, Column], params: list[object]) -> str:
    if isinstance(node, And):
        return "(" + " AND ".join(_sql(text, t, columns, params) for t in node.terms) + ")"
    if isinstance(node, Or):
        return "(" + " OR ".join(_sql(text, t, columns, params) for t in node.terms) + ")"
    if isinstance(node, Not):
        return "(NOT " + _sql(text, node.term, columns, params) + ")"
    column = columns.get(node.field)
    if column is None:
        raise FilterError(
            text,
            node.position,
            f"cannot filter on {node.field!r} (supported: {', '.join(sorted(columns))})",
        )
    if node.op in _FUNCTIONS and column.kind is not str:
        raise FilterError(
            text, node.position, f"{node.op}() needs a string field, {node.field!r} is not"
        )
    for value in node.values:
        # bool is an int in Python: compare the exact type
        if type(value) is not column.kind:
            raise FilterError(
                text,
                node.position,
                f"{node.field!r} is compared with {value!r}; it takes {_kind_name(column.kind)}",
            )
    expr = f"coalesce({column.sql}, '')" if column.nullable else column.sql
    op = node.op
    if op in ("==", "!="):
        params.append(node.values[0])
        return f"{expr} {'=' if op == '==' else '!='} ?"
    if op == "in":
        if not node.values:
            return "0"
        if len(node.values) > _INLINE_IN:
            params.append(json.dumps(list(node.values)))
            return f"{expr} IN (SELECT value FROM json_each(?))"
        params.extend(node.values)
        return f"{expr} IN ({','.join('?' * len(node.values))})"
    value = node.values[0]
    if op == "contains":
        params.append(value)
        return f"instr({expr}, ?) > 0"
    if value == "":
        return "1"
    params.extend((value, value))
    if op == "startsWith":
        return f"substr({expr}, 1, length(?)) = ?"
    return f"substr({expr}, -length(?)) = ?"
