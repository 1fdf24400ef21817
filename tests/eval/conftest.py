"""Markers for the evaluation harness tests (pyproject.toml is not ours to edit)."""

from __future__ import annotations


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    config.addinivalue_line("markers", "model: runs the embedded model on CPU (slow-ish)")
