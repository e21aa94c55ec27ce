"""The public surface of ``daq_agent.ingestion``."""

from __future__ import annotations

import grpc

import daq_agent.ingestion as ingestion


def _isort_key(name: str) -> tuple[int, str]:
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted() -> None:
    """__all__ is sorted (constants, classes, functions) and has no duplicates."""
    assert ingestion.__all__ == sorted(ingestion.__all__, key=_isort_key)
    assert len(set(ingestion.__all__)) == len(ingestion.__all__)


def test_every_name_resolves() -> None:
    """Every name in __all__ is an attribute of the package."""
    missing = [name for name in ingestion.__all__ if not hasattr(ingestion, name)]
    assert missing == []


def test_sift_names_are_exported() -> None:
    """The names of Sift's Python client are all importable from the package."""
    sift_names = {
        "IngestionService",
        "TelemetryConfig",
        "FlowConfig",
        "ChannelConfig",
        "ChannelDataType",
        "ChannelEnumType",
        "ChannelBitFieldElement",
        "ChannelValue",
        "Flow",
        "FlowOrderedChannelValues",
        "IngestionValidationError",
        "use_sift_channel",
        "SiftChannel",
        "SiftChannelConfig",
        "BufferedIngestionService",
        "double_value",
        "float_value",
        "string_value",
        "bool_value",
        "int32_value",
        "uint32_value",
        "int64_value",
        "uint64_value",
        "enum_value",
        "bit_field_value",
        "bytes_value",
        "empty_value",
        "is_data_type",
    }
    assert sift_names <= set(ingestion.__all__)


def test_service_has_the_documented_methods() -> None:
    """IngestionService has every method of the seed API."""
    documented = [
        "attach_run",
        "detach_run",
        "buffered_ingestion",
        "create_flow",
        "create_flows",
        "try_create_flow",
        "try_create_flows",
        "create_ingestion_request",
        "try_create_ingestion_request",
        "ingest",
        "ingest_flows",
        "try_ingest_flows",
        "open_stream",
    ]
    missing = [m for m in documented if not callable(getattr(ingestion.IngestionService, m, None))]
    assert missing == []


def test_stream_and_errors_are_exported() -> None:
    """The data stream, its sample type and the grpc.RpcError of the API are exported, and the
    stream has its documented methods."""
    assert {"IngestStream", "RpcError", "Sample", "telemetry_config_hash"} <= set(ingestion.__all__)
    assert issubclass(ingestion.RpcError, grpc.RpcError)
    for method in ("send", "send_samples", "close", "cancel", "__enter__", "__exit__"):
        assert callable(getattr(ingestion.IngestStream, method, None)), method
