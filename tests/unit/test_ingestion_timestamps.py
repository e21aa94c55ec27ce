"""Timestamp conversion of the ingestion service: nanoseconds kept, time zones honoured."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from daq_agent.core.errors import IngestionValidationError
from daq_agent.ingestion.service import _check_timestamp, _timestamp


@pytest.mark.parametrize(
    ("ns", "seconds", "nanos"),
    [
        (0, 0, 0),
        (1, 0, 1),
        (1_700_000_000_123_456_789, 1_700_000_000, 123_456_789),
        (-1, -1, 999_999_999),
        (2**63 - 1, 9_223_372_036, 854_775_807),
    ],
)
def test_integer_nanoseconds_are_exact(ns: int, seconds: int, nanos: int) -> None:
    """Integer ns become (seconds, nanos) exactly, nanos always in [0, 1e9)."""
    stamp = _timestamp(ns)
    assert (stamp.seconds, stamp.nanos) == (seconds, nanos)
    assert stamp.seconds * 1_000_000_000 + stamp.nanos == ns


def test_aware_datetime_keeps_microseconds() -> None:
    """A UTC datetime keeps its microseconds."""
    stamp = _timestamp(datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC))
    assert stamp.nanos == 999_999_000
    assert stamp.ToDatetime(tzinfo=UTC) == datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC)


def test_offset_datetime_is_converted_unvalidated() -> None:
    """Without validation, an aware non-UTC datetime is converted to the same instant."""
    local = datetime(2024, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    assert _timestamp(local) == _timestamp(datetime(2024, 1, 1, tzinfo=UTC))


def test_naive_datetime_is_taken_as_utc_unvalidated() -> None:
    """Without validation, a naive datetime is taken as UTC (as protobuf does)."""
    naive = datetime(2024, 1, 1)
    assert _timestamp(naive) == _timestamp(datetime(2024, 1, 1, tzinfo=UTC))


def test_out_of_range_is_refused() -> None:
    """A timestamp beyond year 9999 is refused."""
    with pytest.raises(IngestionValidationError, match="out of range"):
        _timestamp(10**30)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (datetime(2024, 1, 1), "no time zone"),
        (datetime(2024, 1, 1, tzinfo=timezone(timedelta(minutes=-30))), "is not UTC"),
        (1.0, "not float"),
        (False, "not bool"),
        ("2024-01-01", "not str"),
    ],
)
def test_validation_refuses(value: object, message: str) -> None:
    """Validation refuses naive and non-UTC datetimes and non-integer numbers."""
    with pytest.raises(IngestionValidationError, match=message):
        _check_timestamp(value)


def test_validation_accepts_utc_forms() -> None:
    """Validation accepts integer ns and datetimes whose offset is zero."""
    _check_timestamp(5)
    _check_timestamp(datetime(2024, 1, 1, tzinfo=UTC))
    _check_timestamp(datetime(2024, 1, 1, tzinfo=timezone(timedelta(0), "Z")))
