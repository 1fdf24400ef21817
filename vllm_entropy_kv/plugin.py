"""What `register()` installs in each vLLM process. Every step is idempotent."""

from __future__ import annotations

from vllm_entropy_kv.cli import install_cli_shim


def register_all() -> None:
    install_cli_shim()
