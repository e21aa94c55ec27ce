"""The local ingestion server's SQLite store: assets, configs, flows, runs and samples in one file.

Layout (schema version 2)::

    assets              id, asset_id (uuid), name (unique), tags (JSON), metadata (serialized),
                        created/modified ns
    ingestion_configs   id, ingestion_config_id (uuid), asset -> assets, client_key (unique), org
    flows               id, config -> ingestion_configs, name, definition (serialized FlowConfig);
                        (config, name) unique
    runs                id, run_id (uuid), name, description, tags (JSON), metadata (serialized),
                        client_key (unique), start/stop ns, is_stopped, created/modified ns
    samples             (flow, run, timestamp_ns) primary key, WITHOUT ROWID; data = a serialized
                        IngestWithConfigDataStreamRequest carrying the values: the request as
                        received, or only its channel_values entries (decoded on read)
    channels            id, channel_id (uuid), asset -> assets, name, definition (serialized
                        ChannelConfig), created ns; (asset, name) unique: an asset's channels
                        are those of the flows of its configs, the first definition of a name wins
    tags                id, tag_id (uuid), name (unique), created ns
    rules               id, rule_id (uuid), client_key (unique), name, definition (serialized
                        ``rules.v1.Rule``), created/modified ns
    validation_errors   time ns, ingestion config id, flow, run id, request index, reason, peer;
                        only the newest ``max_rows`` are kept, the others are counted in ``meta``

A version 1 file is migrated in place when opened for writing.

List methods take ``filters``: either a mapping of field == value, or the text of a Sift filter
(see :mod:`daq_agent.server.filters`); the fields each accepts are Sift's names for them.

One sample is one (ingestion config, flow, run, timestamp ns): the flow row belongs to one config,
``run`` is 0 when the request names no run. Samples are written with ``INSERT OR IGNORE``, so a
re-sent stream is stored once. Timestamps are integer nanoseconds since the Unix epoch throughout.

The writer (:meth:`Store.open`) runs in WAL mode, so readers opened with ``readonly=True`` on other
threads or processes see every committed sample while the server keeps writing.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from google.protobuf.message import DecodeError as ProtobufDecodeError

from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2
from daq_agent.core.errors import DaqError
from daq_agent.server.filters import Column, compile_sql, parse

__all__ = [
    "DEFAULT_MAX_VALIDATION_ERRORS",
    "AssetRecord",
    "ChannelInfo",
    "ChannelRecord",
    "FlowRecord",
    "IngestionConfigRecord",
    "RuleRecord",
    "RunRecord",
    "SampleRow",
    "Store",
    "StoredSample",
    "TagRecord",
    "ValidationErrorRecord",
    "Value",
]

SCHEMA_VERSION = 2
PAGE_SIZE = 65536
DEFAULT_MAX_VALIDATION_ERRORS = 10_000
"""Validation errors kept by default; older ones are deleted and counted."""
_OVERFLOW_KEY = "validation_errors_overflow"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assets (
    id INTEGER PRIMARY KEY,
    asset_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    metadata BLOB NOT NULL DEFAULT x'',
    modified_ns INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ingestion_configs (
    id INTEGER PRIMARY KEY,
    ingestion_config_id TEXT NOT NULL UNIQUE,
    asset INTEGER NOT NULL REFERENCES assets(id),
    client_key TEXT UNIQUE,
    organization_id TEXT NOT NULL DEFAULT '',
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS flows (
    id INTEGER PRIMARY KEY,
    config INTEGER NOT NULL REFERENCES ingestion_configs(id),
    name TEXT NOT NULL,
    definition BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    UNIQUE (config, name)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    metadata BLOB NOT NULL DEFAULT x'',
    client_key TEXT UNIQUE,
    organization_id TEXT NOT NULL DEFAULT '',
    start_ns INTEGER,
    stop_ns INTEGER,
    is_stopped INTEGER NOT NULL DEFAULT 0,
    created_ns INTEGER NOT NULL,
    modified_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs (name);
CREATE TABLE IF NOT EXISTS samples (
    flow INTEGER NOT NULL,
    run INTEGER NOT NULL,
    timestamp_ns INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (flow, run, timestamp_ns)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (
    id INTEGER PRIMARY KEY,
    channel_id TEXT NOT NULL UNIQUE,
    asset INTEGER NOT NULL REFERENCES assets(id),
    name TEXT NOT NULL,
    definition BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    UNIQUE (asset, name)
);
CREATE TABLE IF NOT EXISTS tags (
    id INTEGER PRIMARY KEY,
    tag_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rules (
    id INTEGER PRIMARY KEY,
    rule_id TEXT NOT NULL UNIQUE,
    client_key TEXT UNIQUE,
    name TEXT NOT NULL,
    definition BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    modified_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS validation_errors (
    id INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    ingestion_config_id TEXT NOT NULL,
    flow TEXT NOT NULL,
    run_id TEXT NOT NULL,
    request_index INTEGER NOT NULL,
    reason TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT ''
);
"""

# Version 1 to 2: asset tags, metadata and modification time; the channels, tags and rules
# tables are created by _SCHEMA (which every open runs), channels are then filled from the flows.
_MIGRATE_1_TO_2 = """
ALTER TABLE assets ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
ALTER TABLE assets ADD COLUMN metadata BLOB NOT NULL DEFAULT x'';
ALTER TABLE assets ADD COLUMN modified_ns INTEGER NOT NULL DEFAULT 0;
UPDATE assets SET modified_ns = created_ns;
"""

Value = float | int | bool | str | bytes | None
"""A decoded channel value; None for ``empty``. Enums are their integer key, bit fields bytes."""

SampleRow = tuple[int, int, int, bytes]
"""A sample as written: (flow pk, run pk or 0, timestamp ns, serialized request)."""

# Rows per multi-row INSERT statement: one statement per chunk costs far less than one per row.
_INSERT_CHUNK = 256
_INSERT_SQL = "INSERT OR IGNORE INTO samples (flow, run, timestamp_ns, data) VALUES "


class StoredSample(NamedTuple):
    """One stored sample: ``(flow, timestamp_ns, {channel name: value})``."""

    flow: str
    timestamp_ns: int
    values: dict[str, Value]


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """A channel of a stored flow."""

    name: str
    data_type: int
    """The wire ``ChannelDataType`` value."""


@dataclass(frozen=True, slots=True)
class IngestionConfigRecord:
    """A stored ingestion config."""

    pk: int
    ingestion_config_id: str
    asset_id: str
    asset_name: str
    client_key: str
    organization_id: str


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """A stored flow of an ingestion config."""

    pk: int
    config_pk: int
    ingestion_config_id: str
    name: str
    definition: bytes
    """The serialized ``ingestion_configs.v2.FlowConfig``."""

    def flow_config(self) -> ingestion_configs_pb2.FlowConfig:
        """The flow's wire message."""
        return ingestion_configs_pb2.FlowConfig.FromString(self.definition)

    def channels(self) -> tuple[ChannelInfo, ...]:
        """The flow's channels, in value order."""
        return tuple(ChannelInfo(c.name, c.data_type) for c in self.flow_config().channels)


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A stored run."""

    pk: int
    run_id: str
    name: str
    description: str
    tags: tuple[str, ...]
    metadata: bytes
    """Serialized ``runs.v2.Run`` carrying only the ``metadata`` field."""
    client_key: str | None
    organization_id: str
    start_ns: int | None
    stop_ns: int | None
    is_stopped: bool
    created_ns: int
    modified_ns: int


@dataclass(frozen=True, slots=True)
class AssetRecord:
    """A stored asset (created by name with its first ingestion config)."""

    pk: int
    asset_id: str
    name: str
    tags: tuple[str, ...]
    metadata: bytes
    """Serialized ``assets.v1.Asset`` carrying only the ``metadata`` field."""
    created_ns: int
    modified_ns: int


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """A channel of an asset, as its first flow defined it."""

    pk: int
    channel_id: str
    asset_id: str
    name: str
    definition: bytes
    """The serialized ``ingestion_configs.v2.ChannelConfig``."""
    created_ns: int

    def channel_config(self) -> ingestion_configs_pb2.ChannelConfig:
        """The channel's definition."""
        return ingestion_configs_pb2.ChannelConfig.FromString(self.definition)


@dataclass(frozen=True, slots=True)
class TagRecord:
    """A tag (Sift's tags are names, unique per organization)."""

    pk: int
    tag_id: str
    name: str
    created_ns: int


@dataclass(frozen=True, slots=True)
class RuleRecord:
    """A stored rule: its identity and its definition as Sift's ``Rule`` message."""

    pk: int
    rule_id: str
    client_key: str | None
    name: str
    definition: bytes
    """The serialized ``rules.v1.Rule``."""
    created_ns: int
    modified_ns: int


@dataclass(frozen=True, slots=True)
class ValidationErrorRecord:
    """A request the server refused, as recorded."""

    time_ns: int
    ingestion_config_id: str
    flow: str
    run_id: str
    request_index: int
    """0-based index of the request in its stream."""
    reason: str
    peer: str


_CONFIG_SELECT = (
    "SELECT c.id, c.ingestion_config_id, a.asset_id, a.name, coalesce(c.client_key, ''),"
    " c.organization_id FROM ingestion_configs c JOIN assets a ON a.id = c.asset"
)
_FLOW_SELECT = (
    "SELECT f.id, f.config, c.ingestion_config_id, f.name, f.definition"
    " FROM flows f JOIN ingestion_configs c ON c.id = f.config"
)
_RUN_SELECT = (
    "SELECT id, run_id, name, description, tags, metadata, client_key, organization_id,"
    " start_ns, stop_ns, is_stopped, created_ns, modified_ns FROM runs"
)
_ASSET_SELECT = "SELECT id, asset_id, name, tags, metadata, created_ns, modified_ns FROM assets"
_RULE_SELECT = (
    "SELECT id, rule_id, client_key, name, definition, created_ns, modified_ns FROM rules"
)
_CHANNEL_SELECT = (
    "SELECT ch.id, ch.channel_id, a.asset_id, ch.name, ch.definition, ch.created_ns"
    " FROM channels ch JOIN assets a ON a.id = ch.asset"
)
_TAG_SELECT = "SELECT id, tag_id, name, created_ns FROM tags"
# Filterable fields (Sift's names) of each listing.
_CONFIG_COLUMNS = {
    "ingestion_config_id": Column("c.ingestion_config_id"),
    "client_key": Column("c.client_key", nullable=True),
    "asset_id": Column("a.asset_id"),
    "asset_name": Column("a.name"),
    "organization_id": Column("c.organization_id"),
}
_FLOW_COLUMNS = {"flow_name": Column("f.name"), "name": Column("f.name")}
_RUN_COLUMNS = {
    "run_id": Column("run_id"),
    "name": Column("name"),
    "description": Column("description"),
    "client_key": Column("client_key", nullable=True),
    "organization_id": Column("organization_id"),
    "is_stopped": Column("is_stopped", bool),
}
_ASSET_COLUMNS = {
    "asset_id": Column("asset_id"),
    "name": Column("name"),
    "name_lower": Column("lower(name)"),
    "is_archived": Column("0", bool),
}
_CHANNEL_COLUMNS = {
    "channel_id": Column("ch.channel_id"),
    "asset_id": Column("a.asset_id"),
    "name": Column("ch.name"),
}
_TAG_COLUMNS = {"tag_id": Column("tag_id"), "name": Column("name")}
_RULE_COLUMNS = {
    "rule_id": Column("rule_id"),
    "client_key": Column("client_key", nullable=True),
    "name": Column("name"),
}

Filters = Mapping[str, str] | str | None
"""``{field: value}`` (all must be equal), or the text of a Sift filter, or None for all."""


_R = TypeVar("_R")


def _now_ns() -> int:
    return time.time_ns()


def _config(row: Sequence[object]) -> IngestionConfigRecord:
    pk, config_id, asset_id, asset_name, client_key, org = row
    return IngestionConfigRecord(
        int(pk),  # type: ignore[call-overload]
        str(config_id),
        str(asset_id),
        str(asset_name),
        str(client_key),
        str(org),
    )


def _flow(row: Sequence[object]) -> FlowRecord:
    pk, config_pk, config_id, name, definition = row
    return FlowRecord(
        int(pk),  # type: ignore[call-overload]
        int(config_pk),  # type: ignore[call-overload]
        str(config_id),
        str(name),
        bytes(definition),  # type: ignore[call-overload]
    )


def _run(row: Sequence[object]) -> RunRecord:
    (pk, run_id, name, description, tags, metadata, client_key, org, start, stop, stopped,
     created, modified) = row  # fmt: skip
    return RunRecord(
        pk=int(pk),  # type: ignore[call-overload]
        run_id=str(run_id),
        name=str(name),
        description=str(description),
        tags=tuple(json.loads(str(tags))),
        metadata=bytes(metadata),  # type: ignore[call-overload]
        client_key=None if client_key is None else str(client_key),
        organization_id=str(org),
        start_ns=None if start is None else int(start),  # type: ignore[call-overload]
        stop_ns=None if stop is None else int(stop),  # type: ignore[call-overload]
        is_stopped=bool(stopped),
        created_ns=int(created),  # type: ignore[call-overload]
        modified_ns=int(modified),  # type: ignore[call-overload]
    )


def _where(filters: Filters, columns: Mapping[str, Column]) -> tuple[str, list[object]]:
    """A WHERE condition and its parameters.

    Raises:
        FilterError: a filter text that does not parse or names a field not in ``columns``.
        DaqError: a mapping key not in ``columns``.
    """
    if isinstance(filters, str):
        return compile_sql(filters, parse(filters), columns)
    clauses: list[str] = []
    params: list[object] = []
    for field, value in (filters or {}).items():
        column = columns.get(field)
        if column is None:
            raise DaqError(f"cannot filter on {field!r}")
        clauses.append(f"{column.sql} = ?")
        params.append(value)
    return " AND ".join(clauses) or "1", params


def _keyset(pk: str, after: int, newest_first: bool) -> tuple[str, int, str]:
    """(condition, parameter, ORDER BY) of one page in pk order after the pk ``after``."""
    if newest_first:
        return f"{pk} < ?", after or (1 << 62), f"{pk} DESC"
    return f"{pk} > ?", after, pk


def _asset(row: Sequence[object]) -> AssetRecord:
    pk, asset_id, name, tags, metadata, created, modified = row
    return AssetRecord(
        pk=int(pk),  # type: ignore[call-overload]
        asset_id=str(asset_id),
        name=str(name),
        tags=tuple(json.loads(str(tags))),
        metadata=bytes(metadata),  # type: ignore[call-overload]
        created_ns=int(created),  # type: ignore[call-overload]
        modified_ns=int(modified),  # type: ignore[call-overload]
    )


def _rule(row: Sequence[object]) -> RuleRecord:
    pk, rule_id, client_key, name, definition, created, modified = row
    return RuleRecord(
        pk=int(pk),  # type: ignore[call-overload]
        rule_id=str(rule_id),
        client_key=None if client_key is None else str(client_key),
        name=str(name),
        definition=bytes(definition),  # type: ignore[call-overload]
        created_ns=int(created),  # type: ignore[call-overload]
        modified_ns=int(modified),  # type: ignore[call-overload]
    )


def _channel(row: Sequence[Any]) -> ChannelRecord:
    pk, channel_id, asset_id, name, definition, created = row
    return ChannelRecord(
        int(pk), str(channel_id), str(asset_id), str(name), bytes(definition), int(created)
    )


def _tag(row: Sequence[Any]) -> TagRecord:
    pk, tag_id, name, created = row
    return TagRecord(int(pk), str(tag_id), str(name), int(created))


def decode_values(data: bytes) -> list[Value]:
    """Decode the channel values of a stored request, in flow-channel order.

    Raises:
        DaqError: when ``data`` is not a serialized ``IngestWithConfigDataStreamRequest``.
    """
    try:
        request = ingest_pb2.IngestWithConfigDataStreamRequest.FromString(data)
    except ProtobufDecodeError as exc:
        raise DaqError(f"stored sample cannot be decoded: {exc}") from exc
    values: list[Value] = []
    for value in request.channel_values:
        kind = value.WhichOneof("type")
        values.append(None if kind is None or kind == "empty" else getattr(value, kind))
    return values


def _insert_channels(conn: sqlite3.Connection, flows: Iterable[tuple[int, bytes]]) -> None:
    """Record the channels of flows ``(asset pk, serialized FlowConfig)``; known names are kept."""
    now = _now_ns()
    rows = [
        (str(uuid.uuid4()), asset, channel.name, channel.SerializeToString(), now)
        for asset, definition in flows
        for channel in ingestion_configs_pb2.FlowConfig.FromString(definition).channels
    ]
    conn.executemany(
        "INSERT OR IGNORE INTO channels (channel_id, asset, name, definition, created_ns)"
        " VALUES (?, ?, ?, ?, ?)",
        rows,
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older file to :data:`SCHEMA_VERSION` (one transaction per step)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is not None and row[0] == "1":
        conn.execute("BEGIN")
        for statement in filter(None, (s.strip() for s in _MIGRATE_1_TO_2.split(";"))):
            conn.execute(statement)
        rows = conn.execute(
            "SELECT c.asset, f.definition FROM flows f JOIN ingestion_configs c ON c.id = f.config"
            " ORDER BY f.id"
        ).fetchall()
        _insert_channels(conn, [(int(asset), bytes(definition)) for asset, definition in rows])
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        conn.execute("COMMIT")


class Store:
    """The SQLite file of the local ingestion server.

    A store opened for writing is used by one thread at a time (the server's); every method holds an
    internal lock, so an occasional call from another thread is safe but sees uncommitted writes.
    Readers on other threads open their own ``Store.open(path, readonly=True)``.
    """

    __slots__ = ("_conn", "_lock", "_pending", "_readonly", "path")

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
        """Wrap an open connection; use :meth:`open` instead."""
        self._conn = conn
        self._lock = threading.RLock()
        self._readonly = readonly
        self._pending = 0
        self.path = path

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False, durable: bool = True) -> Store:
        """Open (and for writing, create and migrate) the store at ``path``.

        Args:
            path: the SQLite file.
            readonly: open an existing file for reading only.
            durable: fsync the write-ahead log at every commit (``synchronous=FULL``); with False a
                commit survives a process crash but not a power loss.

        Raises:
            DaqError: when the file is missing (read-only), is not a database of this schema, or
                cannot be opened.
        """
        path = Path(path)
        try:
            if readonly:
                if not path.is_file():
                    raise DaqError(f"no database at {path}")
                conn = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                # Large pages make appending samples markedly cheaper (fewer b-tree splits); the
                # size applies only when the file is created.
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                conn.execute("PRAGMA cache_size=-65536")
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                if tables and "meta" not in tables:
                    conn.close()
                    raise DaqError(f"{path}: not a daq-agent database (refusing to add tables)")
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                _migrate(conn)
            conn.execute("PRAGMA busy_timeout=5000")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as exc:
            raise DaqError(f"cannot open database {path}: {exc}") from exc
        if row is None or row[0] != str(SCHEMA_VERSION):
            conn.close()
            raise DaqError(f"{path}: not a daq-agent database of schema {SCHEMA_VERSION}")
        return cls(conn, path, readonly=readonly)

    def close(self) -> None:
        """Commit what is pending and close; idempotent."""
        with self._lock:
            try:
                self.commit()
                self._conn.close()
            except sqlite3.ProgrammingError:
                pass  # already closed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------

    def commit(self) -> None:
        """Commit the open transaction, if any (samples become visible and durable)."""
        with self._lock:
            if self._conn.in_transaction:
                self._conn.execute("COMMIT")
            self._pending = 0

    @property
    def pending(self) -> int:
        """Sample rows written since the last commit."""
        return self._pending

    def _begin(self) -> None:
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")

    @contextmanager
    def _write(self, conflict: str) -> Iterator[sqlite3.Connection]:
        """One metadata write, committed (with whatever else is pending) when the block ends.

        The write is a savepoint inside the open transaction: when a uniqueness constraint
        refuses it, only its own statements are undone, and the samples and validation errors
        written before it stay pending.

        Raises:
            DaqError: ``conflict``, when a uniqueness constraint refuses the write.
        """
        with self._lock:
            self._begin()
            self._conn.execute("SAVEPOINT metadata_write")
            try:
                yield self._conn
            except BaseException as exc:
                self._conn.execute("ROLLBACK TO metadata_write")
                self._conn.execute("RELEASE metadata_write")
                if isinstance(exc, sqlite3.IntegrityError):
                    raise DaqError(conflict) from exc
                raise
            self._conn.execute("RELEASE metadata_write")
            self.commit()

    def _one(self, sql: str, params: Sequence[object], convert: Callable[[Any], _R]) -> _R | None:
        """The first row of a query, converted; None when there is none."""
        with self._lock:
            row = self._conn.execute(sql, params).fetchone()
        return None if row is None else convert(row)

    def _page(
        self,
        select: str,
        columns: Mapping[str, Column],
        pk: str,
        convert: Callable[[Any], _R],
        filters: Filters,
        *,
        after: int,
        limit: int,
        newest_first: bool = False,
    ) -> list[_R]:
        """One page of a listing: rows matching ``filters`` past pk ``after``, in pk order.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        where, params = _where(filters, columns)
        position, start, order = _keyset(pk, after, newest_first)
        sql = f"{select} WHERE ({where}) AND {position} ORDER BY {order} LIMIT ?"
        with self._lock:
            return [convert(r) for r in self._conn.execute(sql, [*params, start, limit])]

    # -- samples -----------------------------------------------------------------------------

    def insert_samples(self, rows: Sequence[SampleRow]) -> None:
        """Write samples in the open transaction (begun if needed); duplicates are ignored.

        Nothing is durable until :meth:`commit`.
        """
        if not rows:
            return
        with self._lock:
            self._begin()
            execute = self._conn.execute
            full_sql = _INSERT_SQL + ",".join(["(?,?,?,?)"] * _INSERT_CHUNK)
            count = len(rows)
            start = 0
            while count - start >= _INSERT_CHUNK:
                params: list[object] = []
                extend = params.extend
                for row in rows[start : start + _INSERT_CHUNK]:
                    extend(row)
                execute(full_sql, params)
                start += _INSERT_CHUNK
            rest = count - start
            if rest:
                params = []
                extend = params.extend
                for row in rows[start:]:
                    extend(row)
                execute(_INSERT_SQL + ",".join(["(?,?,?,?)"] * rest), params)
            self._pending += count

    def count_samples(self, *, run_id: str | None = None, flow: str | None = None) -> int:
        """Samples (on the writer also uncommitted ones), optionally of one run and/or flow."""
        sql = "SELECT count(*) FROM samples s"
        clauses, params = self._sample_filters(run_id=run_id, flows=[flow] if flow else None)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._lock:
            return int(self._conn.execute(sql, params).fetchone()[0])

    def flow_counts(self, *, run_id: str | None = None) -> dict[str, int]:
        """Samples per flow name (summed over ingestion configs), optionally of one run."""
        sql = "SELECT f.name, count(*) FROM samples s JOIN flows f ON f.id = s.flow"
        clauses, params = self._sample_filters(run_id=run_id)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " GROUP BY f.name ORDER BY f.name"
        with self._lock:
            return {str(name): int(n) for name, n in self._conn.execute(sql, params)}

    def iter_samples(
        self,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        flows: Iterable[str] | None = None,
        ingestion_config_id: str | None = None,
    ) -> Iterator[StoredSample]:
        """Stored samples in timestamp order, decoded: ``(flow, timestamp_ns, {channel: value})``.

        Args:
            run_id: only samples of this run.
            run_name: only samples of runs with this name.
            flows: only these flow names.
            ingestion_config_id: only samples of this ingestion config.

        Raises:
            DaqError: when a stored sample cannot be decoded.
        """
        clauses, params = self._sample_filters(
            run_id=run_id, run_name=run_name, flows=flows, ingestion_config_id=ingestion_config_id
        )
        sql = "SELECT s.flow, s.timestamp_ns, s.data FROM samples s"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY s.timestamp_ns, s.flow, s.run"
        names: dict[int, tuple[str, tuple[str, ...]]] = {}
        with self._lock:
            for pk, name, definition in self._conn.execute(
                "SELECT id, name, definition FROM flows"
            ):
                channels = ingestion_configs_pb2.FlowConfig.FromString(definition).channels
                names[int(pk)] = (str(name), tuple(c.name for c in channels))
            cursor = self._conn.execute(sql, params)
        while True:
            with self._lock:
                batch = cursor.fetchmany(1024)
            if not batch:
                return
            for flow_pk, timestamp_ns, data in batch:
                flow_name, channel_names = names[flow_pk]
                values = decode_values(data)
                yield StoredSample(
                    flow_name, timestamp_ns, dict(zip(channel_names, values, strict=False))
                )

    def sample_stats(self) -> list[tuple[int, int, int, int, int]]:
        """``(flow pk, run pk or 0, samples, first ns, last ns)`` of every flow and run with
        samples, in (flow, run) order.

        One pass over the samples table in its key order (no sort, constant memory).
        """
        sql = (
            "SELECT flow, run, count(*), min(timestamp_ns), max(timestamp_ns) FROM samples"
            " GROUP BY flow, run ORDER BY flow, run"
        )
        with self._lock:
            return [
                (int(f), int(r), int(n), int(lo), int(hi))
                for f, r, n, lo, hi in self._conn.execute(sql)
            ]

    def iter_flow_samples(
        self,
        flow_pk: int,
        run_pk: int,
        *,
        start_ns: int | None = None,
        end_ns: int | None = None,
        batch: int = 512,
    ) -> Generator[tuple[int, bytes], None, None]:
        """``(timestamp ns, serialized request)`` of one flow (by pk) and run (pk, 0 for none) in
        time order, optionally within ``start_ns <= t <= end_ns``, fetched ``batch`` rows at a
        time straight from the primary key (no sort, memory bounded by ``batch``).

        Decode the data with :func:`decode_values`.
        """
        sql = "SELECT timestamp_ns, data FROM samples WHERE flow = ? AND run = ?"
        params: list[object] = [flow_pk, run_pk]
        if start_ns is not None:
            sql += " AND timestamp_ns >= ?"
            params.append(start_ns)
        if end_ns is not None:
            sql += " AND timestamp_ns <= ?"
            params.append(end_ns)
        sql += " ORDER BY timestamp_ns"
        with self._lock:
            cursor = self._conn.execute(sql, params)
        try:
            while True:
                with self._lock:
                    rows = cursor.fetchmany(batch)
                if not rows:
                    return
                for timestamp_ns, data in rows:
                    yield int(timestamp_ns), bytes(data)
        finally:
            with contextlib.suppress(sqlite3.ProgrammingError):  # the store was closed first
                cursor.close()

    def _sample_filters(
        self,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        flows: Iterable[str] | None = None,
        ingestion_config_id: str | None = None,
    ) -> tuple[list[str], list[object]]:
        clauses: list[str] = []
        params: list[object] = []
        if run_id is not None:
            clauses.append("s.run = (SELECT id FROM runs WHERE run_id = ?)")
            params.append(run_id)
        if run_name is not None:
            clauses.append("s.run IN (SELECT id FROM runs WHERE name = ?)")
            params.append(run_name)
        if flows is not None:
            names = list(flows)
            marks = ",".join("?" * len(names))
            clauses.append(f"s.flow IN (SELECT id FROM flows WHERE name IN ({marks}))")
            params.extend(names)
        if ingestion_config_id is not None:
            clauses.append(
                "s.flow IN (SELECT f.id FROM flows f JOIN ingestion_configs c ON c.id = f.config"
                " WHERE c.ingestion_config_id = ?)"
            )
            params.append(ingestion_config_id)
        return clauses, params

    # -- validation errors -------------------------------------------------------------------

    def insert_validation_errors(
        self,
        records: Iterable[ValidationErrorRecord],
        *,
        max_rows: int = DEFAULT_MAX_VALIDATION_ERRORS,
    ) -> None:
        """Record refused requests in the open transaction (begun if needed).

        Only the newest ``max_rows`` are kept: older ones are deleted and added to
        :meth:`validation_errors_overflow`.
        """
        rows = [
            (r.time_ns, r.ingestion_config_id, r.flow, r.run_id, r.request_index, r.reason, r.peer)
            for r in records
        ]
        if not rows:
            return
        with self._lock:
            self._begin()
            conn = self._conn
            conn.executemany(
                "INSERT INTO validation_errors (time_ns, ingestion_config_id, flow, run_id,"
                " request_index, reason, peer) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # ids grow by one per row and the newest is never deleted, so the newest max_rows
            # are exactly those above max(id) - max_rows
            deleted = conn.execute(
                "DELETE FROM validation_errors"
                " WHERE id <= (SELECT max(id) FROM validation_errors) - ?",
                (max(max_rows, 0),),
            ).rowcount
            if deleted > 0:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                    " DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
                    (_OVERFLOW_KEY, deleted),
                )

    def validation_errors_overflow(self) -> int:
        """Validation errors that were recorded and later deleted to keep the table capped."""
        with self._lock:
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = ?", (_OVERFLOW_KEY,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def validation_errors(self, *, limit: int | None = None) -> list[ValidationErrorRecord]:
        """Recorded validation errors, oldest first (the last ``limit`` of them if given)."""
        columns = "time_ns, ingestion_config_id, flow, run_id, request_index, reason, peer"
        sql = f"SELECT {columns} FROM validation_errors ORDER BY id"
        params: list[object] = []
        if limit is not None:
            sql = (
                f"SELECT {columns} FROM (SELECT id, {columns} FROM validation_errors"
                " ORDER BY id DESC LIMIT ?) ORDER BY id"
            )
            params.append(limit)
        with self._lock:
            return [
                ValidationErrorRecord(
                    int(t), str(c), str(f), str(r), int(i), str(reason), str(peer)
                )
                for t, c, f, r, i, reason, peer in self._conn.execute(sql, params)
            ]

    def count_validation_errors(self) -> int:
        """Number of recorded validation errors."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM validation_errors").fetchone()[0])

    # -- assets and ingestion configs --------------------------------------------------------

    def create_ingestion_config(
        self, *, asset_name: str, client_key: str, organization_id: str = ""
    ) -> IngestionConfigRecord:
        """Create a config (and its asset if new) and commit. The caller checks the client key.

        Raises:
            DaqError: when the client key is already taken.
        """
        now = _now_ns()
        config_id = str(uuid.uuid4())
        with self._write(f"ingestion config client key {client_key!r} is taken") as conn:
            row = conn.execute(
                "SELECT id, asset_id FROM assets WHERE name = ?", (asset_name,)
            ).fetchone()
            if row is None:
                asset_id = str(uuid.uuid4())
                asset_pk = conn.execute(
                    "INSERT INTO assets (asset_id, name, created_ns, modified_ns)"
                    " VALUES (?, ?, ?, ?)",
                    (asset_id, asset_name, now, now),
                ).lastrowid
            else:
                asset_pk, asset_id = row
            pk = conn.execute(
                "INSERT INTO ingestion_configs (ingestion_config_id, asset, client_key,"
                " organization_id, created_ns) VALUES (?, ?, ?, ?, ?)",
                (config_id, asset_pk, client_key or None, organization_id, now),
            ).lastrowid
        assert pk is not None
        return IngestionConfigRecord(
            pk, config_id, str(asset_id), asset_name, client_key, organization_id
        )

    def get_asset(self, asset_id: str) -> AssetRecord | None:
        """The asset with this id, or None."""
        return self._one(_ASSET_SELECT + " WHERE asset_id = ?", (asset_id,), _asset)

    def list_assets(
        self,
        filters: Filters = None,
        *,
        after: int = 0,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[AssetRecord]:
        """Assets matching ``filters`` (fields ``asset_id``, ``name``, ``name_lower``,
        ``is_archived``) in creation order (or newest first), past pk ``after``.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        return self._page(
            _ASSET_SELECT, _ASSET_COLUMNS, "id", _asset, filters,
            after=after, limit=limit, newest_first=newest_first,
        )  # fmt: skip

    def update_asset(
        self,
        asset_id: str,
        *,
        tags: Sequence[str] | None = None,
        metadata: bytes | None = None,
    ) -> AssetRecord | None:
        """Replace an asset's tags and/or metadata (None: unchanged) and commit; None if the asset
        does not exist."""
        sets: list[str] = ["modified_ns = ?"]
        params: list[object] = [_now_ns()]
        if tags is not None:
            sets.append("tags = ?")
            params.append(json.dumps(list(tags)))
        if metadata is not None:
            sets.append("metadata = ?")
            params.append(metadata)
        with self._lock:
            self._begin()
            cursor = self._conn.execute(
                f"UPDATE assets SET {', '.join(sets)} WHERE asset_id = ?", [*params, asset_id]
            )
            self.commit()
            if cursor.rowcount == 0:
                return None
        return self.get_asset(asset_id)

    def get_ingestion_config(self, ingestion_config_id: str) -> IngestionConfigRecord | None:
        """The config with this id, or None."""
        return self._one(
            _CONFIG_SELECT + " WHERE c.ingestion_config_id = ?", (ingestion_config_id,), _config
        )

    def list_ingestion_configs(
        self, filters: Filters = None, *, after: int = 0, limit: int = 1000
    ) -> list[IngestionConfigRecord]:
        """Configs matching ``filters``, by pk after ``after``.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        return self._page(
            _CONFIG_SELECT, _CONFIG_COLUMNS, "c.id", _config, filters, after=after, limit=limit
        )

    # -- flows -------------------------------------------------------------------------------

    def add_flows(self, config_pk: int, flows: Sequence[tuple[str, bytes]]) -> None:
        """Add flows ``(name, serialized FlowConfig)`` to a config and commit, all or none.

        Raises:
            DaqError: when a flow name already exists in the config (nothing is added).
        """
        now = _now_ns()
        names = ", ".join(repr(name) for name, _ in flows)
        with self._write(f"a flow of {names} already exists in the config") as conn:
            conn.executemany(
                "INSERT INTO flows (config, name, definition, created_ns) VALUES (?, ?, ?, ?)",
                [(config_pk, name, definition, now) for name, definition in flows],
            )
            (asset,) = conn.execute(
                "SELECT asset FROM ingestion_configs WHERE id = ?", (config_pk,)
            ).fetchone()
            _insert_channels(conn, [(int(asset), d) for _, d in flows])

    def get_flow(self, ingestion_config_id: str, name: str) -> FlowRecord | None:
        """The flow ``name`` of a config, or None."""
        return self._one(
            _FLOW_SELECT + " WHERE c.ingestion_config_id = ? AND f.name = ?",
            (ingestion_config_id, name),
            _flow,
        )

    def flow_names(self, config_pk: int) -> set[str]:
        """Names of the flows of a config."""
        with self._lock:
            rows = self._conn.execute("SELECT name FROM flows WHERE config = ?", (config_pk,))
            return {str(name) for (name,) in rows}

    def list_flows(
        self,
        config_pk: int | None = None,
        filters: Filters = None,
        *,
        after: int = 0,
        limit: int | None = None,
    ) -> list[FlowRecord]:
        """Flows (of one config if given) matching ``filters``, by pk after ``after``.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        where, args = _where(filters, _FLOW_COLUMNS)
        clauses = [f"({where})"]
        if config_pk is not None:
            clauses.append("f.config = ?")
            args.append(config_pk)
        clauses.append("f.id > ?")
        args.append(after)
        sql = f"{_FLOW_SELECT} WHERE {' AND '.join(clauses)} ORDER BY f.id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            return [_flow(r) for r in self._conn.execute(sql, args)]

    # -- runs --------------------------------------------------------------------------------

    def create_run(
        self,
        *,
        name: str,
        description: str = "",
        tags: Sequence[str] = (),
        metadata: bytes = b"",
        client_key: str | None = None,
        organization_id: str = "",
        start_ns: int | None = None,
        stop_ns: int | None = None,
    ) -> RunRecord:
        """Create a run and commit.

        Raises:
            DaqError: when the client key is already taken.
        """
        now = _now_ns()
        run_id = str(uuid.uuid4())
        with self._write(f"run client key {client_key!r} is taken") as conn:
            pk = conn.execute(
                "INSERT INTO runs (run_id, name, description, tags, metadata, client_key,"
                " organization_id, start_ns, stop_ns, is_stopped, created_ns, modified_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (run_id, name, description, json.dumps(list(tags)), metadata, client_key,
                 organization_id, start_ns, stop_ns, now, now),
            ).lastrowid  # fmt: skip
        assert pk is not None
        return RunRecord(
            pk, run_id, name, description, tuple(tags), metadata, client_key, organization_id,
            start_ns, stop_ns, False, now, now,
        )  # fmt: skip

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or None."""
        return self._one(_RUN_SELECT + " WHERE run_id = ?", (run_id,), _run)

    def list_runs(
        self,
        filters: Filters = None,
        *,
        after: int = 0,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[RunRecord]:
        """Runs matching ``filters`` in creation order (or newest first), past pk ``after``.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        return self._page(
            _RUN_SELECT, _RUN_COLUMNS, "id", _run, filters,
            after=after, limit=limit, newest_first=newest_first,
        )  # fmt: skip

    def stop_run(self, run_id: str, stop_ns: int | None = None) -> RunRecord | None:
        """Mark a run stopped (stop time now unless given) and commit; None if it does not exist."""
        now = _now_ns()
        with self._lock:
            self._begin()
            cursor = self._conn.execute(
                "UPDATE runs SET is_stopped = 1, stop_ns = ?, modified_ns = ? WHERE run_id = ?",
                (now if stop_ns is None else stop_ns, now, run_id),
            )
            self.commit()
            if cursor.rowcount == 0:
                return None
        return self.get_run(run_id)

    _RUN_UPDATABLE = frozenset(
        {"name", "description", "tags", "metadata", "client_key", "start_ns", "stop_ns",
         "is_stopped"}
    )  # fmt: skip

    def update_run(self, run_id: str, changes: Mapping[str, object]) -> RunRecord | None:
        """Set the given fields of a run and commit; None if the run does not exist.

        Args:
            run_id: the run.
            changes: new values by field: ``name``, ``description``, ``tags`` (a sequence),
                ``metadata`` (serialized ``Run`` with only metadata), ``client_key``,
                ``start_ns``/``stop_ns`` (int or None), ``is_stopped``.

        Raises:
            DaqError: a field that cannot be updated, or a client key another run has.
        """
        unknown = set(changes) - self._RUN_UPDATABLE
        if unknown:
            raise DaqError(f"cannot update run field(s) {', '.join(sorted(unknown))}")
        sets: list[str] = ["modified_ns = ?"]
        params: list[object] = [_now_ns()]
        for name, value in sorted(changes.items()):
            sets.append(f"{name} = ?")
            if name == "tags":
                params.append(json.dumps(list(value)))  # type: ignore[call-overload]
            elif name == "is_stopped":
                params.append(int(bool(value)))
            else:
                params.append(value)
        with self._write(f"run client key {changes.get('client_key')!r} is taken") as conn:
            cursor = conn.execute(
                f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", [*params, run_id]
            )
        return None if cursor.rowcount == 0 else self.get_run(run_id)

    # -- rules -------------------------------------------------------------------------------

    def create_rule(
        self, *, name: str, client_key: str | None, definition: bytes, rule_id: str | None = None
    ) -> RuleRecord:
        """Create a rule and commit (with a new ``rule_id`` unless given).

        Raises:
            DaqError: when the client key or rule id is already taken.
        """
        now = _now_ns()
        rule_id = rule_id or str(uuid.uuid4())
        with self._write(f"rule client key {client_key!r} or id {rule_id!r} is taken") as conn:
            pk = conn.execute(
                "INSERT INTO rules (rule_id, client_key, name, definition, created_ns,"
                " modified_ns) VALUES (?, ?, ?, ?, ?, ?)",
                (rule_id, client_key or None, name, definition, now, now),
            ).lastrowid
        assert pk is not None
        return RuleRecord(pk, rule_id, client_key or None, name, definition, now, now)

    def update_rule(
        self, rule_id: str, *, name: str, client_key: str | None, definition: bytes
    ) -> RuleRecord | None:
        """Replace a rule's name, client key and definition and commit; None if it does not exist.

        Raises:
            DaqError: when the new client key belongs to another rule.
        """
        with self._write(f"rule client key {client_key!r} is taken") as conn:
            cursor = conn.execute(
                "UPDATE rules SET name = ?, client_key = ?, definition = ?, modified_ns = ?"
                " WHERE rule_id = ?",
                (name, client_key or None, definition, _now_ns(), rule_id),
            )
        return None if cursor.rowcount == 0 else self.get_rule(rule_id=rule_id)

    def get_rule(
        self, *, rule_id: str | None = None, client_key: str | None = None
    ) -> RuleRecord | None:
        """The rule with this id (or else this client key), or None."""
        if rule_id:
            where, value = "rule_id = ?", rule_id
        elif client_key:
            where, value = "client_key = ?", client_key
        else:
            return None
        return self._one(f"{_RULE_SELECT} WHERE {where}", (value,), _rule)

    def list_rules(
        self,
        filters: Filters = None,
        *,
        after: int = 0,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[RuleRecord]:
        """Rules matching ``filters`` (fields ``rule_id``, ``client_key``, ``name``) in creation
        order (or newest first), past pk ``after``.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        return self._page(
            _RULE_SELECT, _RULE_COLUMNS, "id", _rule, filters,
            after=after, limit=limit, newest_first=newest_first,
        )  # fmt: skip

    # -- channels and tags -------------------------------------------------------------------

    def list_channels(
        self, filters: Filters = None, *, after: int = 0, limit: int = 1000
    ) -> list[ChannelRecord]:
        """Channels matching ``filters`` (fields ``channel_id``, ``asset_id``, ``name``), by pk.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        return self._page(
            _CHANNEL_SELECT, _CHANNEL_COLUMNS, "ch.id", _channel, filters, after=after, limit=limit
        )

    def create_tag(self, name: str) -> TagRecord:
        """Create a tag and commit.

        Raises:
            DaqError: when a tag has this name.
        """
        now = _now_ns()
        tag_id = str(uuid.uuid4())
        with self._write(f"a tag named {name!r} exists") as conn:
            pk = conn.execute(
                "INSERT INTO tags (tag_id, name, created_ns) VALUES (?, ?, ?)",
                (tag_id, name, now),
            ).lastrowid
        assert pk is not None
        return TagRecord(pk, tag_id, name, now)

    def list_tags(
        self, filters: Filters = None, *, after: int = 0, limit: int = 1000
    ) -> list[TagRecord]:
        """Tags matching ``filters`` (fields ``tag_id``, ``name``), by pk.

        Raises:
            DaqError: for a bad filter (:class:`FilterError` for a bad filter text).
        """
        return self._page(_TAG_SELECT, _TAG_COLUMNS, "id", _tag, filters, after=after, limit=limit)
