"""The registry lists every policy and explains unknown names; the package never imports vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_entropy_kv.policies import KVPolicy, available_policies, get_policy, register_policy

NAMES = ["entropy", "entropy-merge", "expected-attention", "h2o", "none", "pyramid", "random", "snapkv", "src",
         "streaming", "topk"]


def test_lists_all_policies() -> None:
    assert available_policies() == NAMES


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        get_policy("h3o")
    message = str(err.value)
    assert "h3o" in message
    for name in NAMES:
        assert name in message


def test_parameters_pass_through() -> None:
    assert get_policy("snapkv", kernel_size=9).kernel_size == 9
    with pytest.raises(TypeError):
        get_policy("snapkv", nonsense=1)


def test_name_clash_is_rejected() -> None:
    class Impostor(KVPolicy):
        name = "topk"

        def plan(self, layers, budget):  # type: ignore[no-untyped-def]
            return []

    with pytest.raises(ValueError, match="taken"):
        register_policy(Impostor)


def test_no_vllm_import() -> None:
    code = (
        "import sys, vllm_entropy_kv.policies as p; p.available_policies(); "
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
