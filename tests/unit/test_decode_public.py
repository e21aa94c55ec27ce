"""The public surface of ``daq_agent.decode``."""

from __future__ import annotations

import daq_agent.decode as decode


def _isort_key(name: str) -> tuple[int, str]:
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_every_name_resolves() -> None:
    """``__all__`` is sorted (constants, classes, functions) and each name is importable."""
    assert decode.__all__ == sorted(decode.__all__, key=_isort_key)
    assert all(getattr(decode, name, None) is not None for name in decode.__all__)
    assert {"CanDecoder", "load_database", "derive_flows_fingerprint"} <= set(decode.__all__)
