"""Loading CAN databases (DBC, KCD, ARXML, SYM) the way real benches need it.

Real-world databases are messy. :func:`load_database` accepts every database cantools loads in
non-strict mode and goes further where the intent is clear, each time with a
:class:`DatabaseWarning` that names the file and line:

* odd encodings: UTF-8 (with or without BOM), then cp1252, then latin-1;
* a frame id above 0x7FF not marked extended is treated as extended (29-bit);
* a value table (``VAL_``) or value type (``SIG_VALTYPE_``) for a signal that does not exist is
  dropped (cantools refuses the whole file for it);
* duplicate message names and duplicate frame ids are reported (cantools keeps the last one of a
  frame id for decoding; so do we).

A real syntax error becomes one :class:`~daq_agent.core.errors.ConfigError` line naming the
file, the line and the column, never a traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import ParseError as XmlParseError

import cantools
import textparser
from cantools.database.can import Database
from cantools.database.errors import UnsupportedDatabaseFormatError

from daq_agent.core.errors import ConfigError

__all__ = ["DatabaseWarning", "load_database"]

log = logging.getLogger("daq_agent.decode")

_FORMATS = {".dbc": "dbc", ".kcd": "kcd", ".arxml": "arxml", ".xml": "arxml", ".sym": "sym"}
_EXTENDED_FLAG = 0x80000000
_MAX_STANDARD_ID = 0x7FF
_MAX_EXTENDED_ID = 0x1FFFFFFF


@dataclass(frozen=True, slots=True)
class DatabaseWarning:
    """Something odd in a database that the loader worked around.

    Attributes:
        source: the database file.
        line: the 1-based line it was found on, if known.
        message: what was found and what was done about it.
    """

    source: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.message}"


def load_database(path: str | Path, *, warnings: list[DatabaseWarning] | None = None) -> Database:
    """Load a CAN database, tolerating the usual real-world mess.

    The format follows the file extension (``.dbc``, ``.kcd``, ``.arxml``/``.xml``, ``.sym``);
    any other file is read as DBC when it looks like one, else left to cantools' detection.

    Args:
        path: the database file.
        warnings: if given, every :class:`DatabaseWarning` is appended to it (they are also
            logged to the ``daq_agent.decode`` logger).

    Returns:
        The cantools database (non-strict), with extended-id fixes applied.

    Raises:
        ConfigError: the file cannot be read, or does not parse (one line with file, line and
            column where the parser reports them).
    """
    source = str(path)
    collected: list[DatabaseWarning] = []
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read database: {exc.strerror or exc}", source=source) from exc
    text = _decode_text(raw)
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        fmt = "dbc" if _looks_like_dbc(text) else None
    with _captured_cantools_logs(source, collected):
        if fmt == "dbc":
            database = _load_dbc(text, source, collected)
        else:
            database = _load_other(text, fmt, source)
    for warning in collected:
        log.warning("%s", warning)
    if warnings is not None:
        warnings.extend(collected)
    return database


def _decode_text(raw: bytes) -> str:
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _looks_like_dbc(text: str) -> bool:
    return bool(re.search(r"^\s*(VERSION|NS_|BU_|BO_)\b", text, re.MULTILINE))


@contextmanager
def _captured_cantools_logs(source: str, into: list[DatabaseWarning]) -> Iterator[None]:
    """Turn cantools' own load-time log warnings into :class:`DatabaseWarning` entries."""

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if not text.startswith("Overwriting message"):  # reported with its line already
                into.append(DatabaseWarning(source, None, f"cantools: {text}"))

    logger = logging.getLogger("cantools")
    handler = _Collect(level=logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _load_other(text: str, fmt: str | None, source: str) -> Database:
    loaded: object
    try:
        if fmt is None:
            loaded = cantools.database.load_string(text, strict=False)
        else:
            loaded = Database(strict=False)
            getattr(loaded, f"add_{fmt}_string")(text)
    except UnsupportedDatabaseFormatError as exc:
        for inner in (exc.e_dbc, exc.e_sym, exc.e_kcd, exc.e_arxml):
            if isinstance(inner, textparser.ParseError | XmlParseError):
                raise _parse_error(inner, source) from exc
        raise ConfigError(
            f"not a CAN database cantools can read: {_one_line(exc)}", source=source
        ) from exc
    except (textparser.ParseError, XmlParseError) as exc:
        raise _parse_error(exc, source) from exc
    except Exception as exc:  # cantools raises many types for a malformed file
        raise ConfigError(f"cannot load database: {_one_line(exc)}", source=source) from exc
    if not isinstance(loaded, Database):
        raise ConfigError("not a CAN database (a diagnostics database?)", source=source)
    return loaded


def _parse_error(exc: textparser.ParseError | XmlParseError, source: str) -> ConfigError:
    if isinstance(exc, textparser.ParseError):
        return _syntax_error(exc, source)
    line, column = exc.position
    reason = str(exc).split(":")[0]
    return ConfigError(
        f"XML syntax error at column {column + 1}: {reason}", source=source, line=line
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _syntax_error(exc: textparser.ParseError, source: str) -> ConfigError:
    line_text = exc.text.splitlines()[exc.line - 1] if exc.text else ""
    near = line_text.strip()
    if len(near) > 60:
        near = near[:57] + "..."
    return ConfigError(
        f"syntax error at column {exc.column}: {near!r}", source=source, line=exc.line
    )


# --- DBC -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Statement:
    keyword: str
    tokens: list[str]
    line: int
    start: int  # offset of the keyword in the text


@dataclass(slots=True)
class _DbcMessage:
    dbc_id: int
    name: str
    line: int
    signals: set[str]


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s:;,|@"]+|[:;,|@]')


def _scan_statements(text: str) -> Iterator[_Statement]:
    """Yield the statements that start a line (outside strings), with their first tokens."""
    in_string = False
    offset = 0
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if not in_string:
            stripped = line.lstrip()
            if stripped:
                tokens = _TOKEN.findall(stripped)
                if tokens:
                    yield _Statement(
                        tokens[0], tokens[1:], number, offset + len(line) - len(stripped)
                    )
        if _unescaped_quotes(line) % 2 == 1:
            in_string = not in_string
        offset += len(line)


def _unescaped_quotes(line: str) -> int:
    return len(re.findall(r'(?<!\\)"', line))


def _statement_end(text: str, start: int) -> int:
    """Offset just past the ``;`` that ends the statement starting at ``start``."""
    in_string = False
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\" and in_string:
            i += 2
            continue
        if char == '"':
            in_string = not in_string
        elif char == ";" and not in_string:
            return i + 1
        i += 1
    return len(text)


def _blank(chars: list[str], start: int, end: int) -> None:
    for i in range(start, end):
        if chars[i] not in "\r\n":
            chars[i] = " "


def _as_int(token: str) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def _scan_messages(
    text: str, duplicate_signals: list[tuple[int, str, str]] | None = None
) -> tuple[dict[int, _DbcMessage], list[_Statement], list[tuple[_Statement, _DbcMessage]]]:
    """The messages (by DBC id), the statements that start a line, and each BO_ statement.

    A signal defined twice in one message is appended to ``duplicate_signals`` as
    ``(line, message, signal)``.
    """
    messages: dict[int, _DbcMessage] = {}
    statements: list[_Statement] = []
    definitions: list[tuple[_Statement, _DbcMessage]] = []
    current: _DbcMessage | None = None
    for statement in _scan_statements(text):
        statements.append(statement)
        keyword = statement.keyword
        if keyword == "BO_" and len(statement.tokens) >= 2:
            dbc_id = _as_int(statement.tokens[0])
            if dbc_id is None:
                current = None
                continue
            current = _DbcMessage(dbc_id, statement.tokens[1].rstrip(":"), statement.line, set())
            definitions.append((statement, current))
            messages.setdefault(dbc_id, current)
            if messages[dbc_id] is not current:
                current.signals = messages[dbc_id].signals  # same id: cantools merges lookups
        elif keyword == "SG_" and current is not None and statement.tokens:
            if statement.tokens[0] in current.signals and duplicate_signals is not None:
                duplicate_signals.append((statement.line, current.name, statement.tokens[0]))
            current.signals.add(statement.tokens[0])
        else:
            current = None
    return messages, statements, definitions


# Where a statement names a frame id: right after the keyword, or after ``BO_``/``SG_`` inside a
# CM_/BA_/BA_REL_ statement, or after the node of a ``BU_BO_REL_`` relation attribute.
_ID_FIRST = frozenset({"BO_", "VAL_", "SIG_VALTYPE_", "SG_MUL_VAL_", "BO_TX_BU_", "SIG_GROUP_"})
_ID_NESTED = frozenset({"CM_", "BA_", "BA_REL_"})
_TOKEN_AT = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s:;,|@"]+|[:;,|@]')


def _frame_id_token(text: str, statement: _Statement) -> tuple[int, int] | None:
    """The (start, end) offsets of the frame id a statement refers to, if any."""
    if statement.keyword == "BO_":
        end = text.find("\n", statement.start)
        end = len(text) if end < 0 else end
    else:
        end = _statement_end(text, statement.start)
    tokens = list(_TOKEN_AT.finditer(text, statement.start, end))
    for index in range(1, len(tokens)):
        token = tokens[index].group()
        if not token.isdigit():
            continue
        before = tokens[index - 1].group()
        if statement.keyword in _ID_FIRST:
            return tokens[index].span() if index == 1 else None
        if statement.keyword in _ID_NESTED and (
            before in ("BO_", "SG_") or (index >= 2 and tokens[index - 2].group() == "BU_BO_REL_")
        ):
            return tokens[index].span()
    return None


def _load_dbc(text: str, source: str, warnings: list[DatabaseWarning]) -> Database:
    text = _extend_high_standard_ids(text, source, warnings)
    duplicate_signals: list[tuple[int, str, str]] = []
    messages, statements, definitions = _scan_messages(text, duplicate_signals)
    _warn_duplicates(definitions, source, warnings)
    for line, message_name, signal_name in duplicate_signals:
        warnings.append(
            DatabaseWarning(
                source,
                line,
                f"message {message_name!r} defines signal {signal_name!r} twice; "
                "the second becomes a channel with a numbered name",
            )
        )
    orphans: list[_Statement] = []
    for statement in statements:
        if statement.keyword not in ("VAL_", "SIG_VALTYPE_") or len(statement.tokens) < 2:
            continue
        dbc_id = _as_int(statement.tokens[0])
        if dbc_id is None:
            continue  # a value table of an environment variable
        message = messages.get(dbc_id)
        signal = statement.tokens[1]
        if message is not None and signal in message.signals:
            continue
        orphans.append(statement)
        what = "value table" if statement.keyword == "VAL_" else "value type"
        owner = (
            f"message {message.name!r}" if message else f"unknown frame id {_format_dbc_id(dbc_id)}"
        )
        warnings.append(
            DatabaseWarning(
                source,
                statement.line,
                f"{what} ({statement.keyword}) for signal {signal!r} of {owner}, "
                "which does not exist; dropped",
            )
        )
    if orphans:
        chars = list(text)
        for statement in orphans:
            _blank(chars, statement.start, _statement_end(text, statement.start))
        text = "".join(chars)
    database = Database(strict=False)
    try:
        database.add_dbc_string(text)
    except textparser.ParseError as exc:
        raise _syntax_error(exc, source) from exc
    except Exception as exc:  # cantools raises many types for a malformed file
        raise ConfigError(f"cannot load DBC: {_one_line(exc)}", source=source) from exc
    return database


def _extend_high_standard_ids(text: str, source: str, warnings: list[DatabaseWarning]) -> str:
    """Mark standard ids above 0x7FF as extended everywhere the DBC names them."""
    messages, statements, definitions = _scan_messages(text)
    bad = {dbc_id for dbc_id in messages if _MAX_STANDARD_ID < dbc_id <= _MAX_EXTENDED_ID}
    if not bad:
        return text
    for statement, message in definitions:
        if message.dbc_id in bad:
            warnings.append(
                DatabaseWarning(
                    source,
                    statement.line,
                    f"message {message.name!r}: frame id 0x{message.dbc_id:X} is above 0x7FF "
                    "but not marked extended; treated as a 29-bit id",
                )
            )
    edits: list[tuple[int, int, str]] = []
    for statement in statements:
        span = _frame_id_token(text, statement)
        if span is not None and int(text[span[0] : span[1]]) in bad:
            edits.append((span[0], span[1], str(int(text[span[0] : span[1]]) | _EXTENDED_FLAG)))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _warn_duplicates(
    definitions: list[tuple[_Statement, _DbcMessage]], source: str, warnings: list[DatabaseWarning]
) -> None:
    by_id: dict[int, _DbcMessage] = {}
    by_name: dict[str, _DbcMessage] = {}
    for statement, message in definitions:
        first = by_id.get(message.dbc_id)
        if first is not None:
            warnings.append(
                DatabaseWarning(
                    source,
                    statement.line,
                    f"message {message.name!r} repeats frame id {_format_dbc_id(message.dbc_id)} "
                    f"of {first.name!r} (line {first.line}); the last one is used for decoding",
                )
            )
        else:
            by_id[message.dbc_id] = message
        first = by_name.get(message.name)
        if first is not None and message.name != "VECTOR__INDEPENDENT_SIG_MSG":
            warnings.append(
                DatabaseWarning(
                    source,
                    statement.line,
                    f"duplicate message name {message.name!r} (first on line {first.line}); "
                    "its flow name gets the frame id appended",
                )
            )
        else:
            by_name.setdefault(message.name, message)


def _format_dbc_id(dbc_id: int) -> str:
    if dbc_id & _EXTENDED_FLAG:
        return f"0x{dbc_id & ~_EXTENDED_FLAG:08X} (extended)"
    return f"0x{dbc_id:03X}"
