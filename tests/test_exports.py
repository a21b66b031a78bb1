"""The public API: every name in __all__ exists and is sorted (httpx's test)."""

from __future__ import annotations

import governor


def test_all_exported_and_sorted() -> None:
    for name in governor.__all__:
        assert hasattr(governor, name), name
    assert governor.__all__ == sorted(governor.__all__)
