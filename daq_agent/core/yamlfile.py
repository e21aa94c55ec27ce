"""Reading the project's YAML files (configs, frame definitions, register maps, query files) with
errors that name the file, the line and the key.

:func:`load_yaml` reads and parses a file in one pass and returns the document with a line index
(``"buses[0].dbc"`` → 1-based line), so a validator can name the line of the key it refuses
(:func:`line_for` walks up to the nearest indexed parent).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from daq_agent.core.errors import ConfigError

__all__ = ["line_for", "load_yaml", "parse_yaml", "read_text"]


def read_text(path: str | Path) -> str:
    """The file's text (UTF-8).

    Raises:
        ConfigError: it cannot be read or is not UTF-8 (naming the file).
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason}", source=str(path)) from exc


def parse_yaml(text: str, source: str) -> tuple[object, dict[str, int]]:
    """One YAML document and its line index (key path → 1-based line).

    Raises:
        ConfigError: the text is not YAML (naming the source and the line).
    """
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            document = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", source=source, line=line) from exc
    lines: dict[str, int] = {}
    if node is not None:
        _index_lines(node, "", lines)
    return document, lines


def load_yaml(path: str | Path) -> tuple[object, dict[str, int]]:
    """:func:`read_text` then :func:`parse_yaml`."""
    return parse_yaml(read_text(path), str(path))


def line_for(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of key path ``path``, or of its nearest parent that has one."""
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""


def _index_lines(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            lines[sub] = key_node.start_mark.line + 1
            _index_lines(value_node, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, f"{path}[{i}]", lines)
