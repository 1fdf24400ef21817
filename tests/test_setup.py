"""Start-up adjustments (`engine/setup.py`): every vLLM setting the plugin changes is logged
once, at WARNING, with old value, new value and reason; settings already right are not.

Runs `prepare_engine_args` on a real `EngineArgs` for the embedded model; no server starts.
"""

from __future__ import annotations

import logging

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_entropy_kv import assets
from vllm_entropy_kv.config import KVPolicyConfig
from vllm_entropy_kv.engine import setup
from vllm_entropy_kv.engine.setup import (
    COMPRESSION_BLOCK_SIZE,
    RESERVED_CPU_ENV,
    prepare_engine_args,
)

POLICY = KVPolicyConfig(policy="entropy")
# Every setting `prepare_engine_args` may change, as its log line names it.
ADJUSTED = ("block_size", RESERVED_CPU_ENV)
# vLLM's scheduling settings, which compression leaves as they are.
SCHEDULING = {"enable_chunked_prefill": True, "async_scheduling": True,
              "max_num_batched_tokens": 64}


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(assets.prepare_model())


@pytest.fixture
def unset_reserved_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first so that monkeypatch restores the variable (or its absence) afterwards,
    # although prepare_engine_args sets it.
    monkeypatch.setenv(RESERVED_CPU_ENV, "0")
    monkeypatch.delenv(RESERVED_CPU_ENV)


def adjustment_warnings(caplog: pytest.LogCaptureFixture) -> dict[str, list[str]]:
    """The plugin's WARNING lines about changed settings, by setting name."""
    found: dict[str, list[str]] = {}
    for record in caplog.records:
        if record.name != setup.logger.name or record.levelno != logging.WARNING:
            continue
        message = record.getMessage()
        setting = message.removeprefix("vllm-entropy-kv: ").split(" ", 1)[0]
        found.setdefault(setting, []).append(message)
    return found


def test_the_plugin_logger_reaches_pytest() -> None:
    # vLLM's own "vllm" logger does not propagate; ours must, or caplog would see nothing
    # and the tests below would pass vacuously.
    assert not setup.logger.name.startswith("vllm.")
    assert setup.logger.propagate


def test_every_changed_setting_is_logged_once_with_old_new_and_reason(
    model_dir: str, unset_reserved_cpus: None, caplog: pytest.LogCaptureFixture
) -> None:
    args = EngineArgs(model=model_dir, enable_prefix_caching=True, **SCHEDULING)
    with caplog.at_level(logging.WARNING, logger=setup.logger.name):
        prepare_engine_args(args, POLICY)
    warnings = adjustment_warnings(caplog)
    assert sorted(warnings) == sorted(ADJUSTED)
    assert all(len(lines) == 1 for lines in warnings.values()), warnings
    expected = {
        "block_size": f"unset (vLLM's default) -> {COMPRESSION_BLOCK_SIZE}: ",
        RESERVED_CPU_ENV: "unset (vLLM's default) -> 1: ",
    }
    for setting, change in expected.items():
        assert f"vllm-entropy-kv: {setting} {change}" in warnings[setting][0]
    assert args.block_size == COMPRESSION_BLOCK_SIZE
    # Prefix caching, chunked prefill, async scheduling and the step's token budget stay the
    # user's.
    assert args.enable_prefix_caching is True
    assert {name: getattr(args, name) for name in SCHEDULING} == SCHEDULING


def test_vllm_defaults_that_change_are_logged_as_unset(
    model_dir: str, unset_reserved_cpus: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=setup.logger.name):
        prepare_engine_args(EngineArgs(model=model_dir), POLICY)
    warnings = adjustment_warnings(caplog)
    assert f"block_size unset (vLLM's default) -> {COMPRESSION_BLOCK_SIZE}" in \
        warnings["block_size"][0]
    assert not set(warnings) & {*SCHEDULING, "enable_prefix_caching"}


def test_settings_already_right_are_not_logged(
    model_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(RESERVED_CPU_ENV, "1")
    args = EngineArgs(model=model_dir, enable_prefix_caching=False, block_size=64,
                      max_num_batched_tokens=1 << 20)
    with caplog.at_level(logging.WARNING, logger=setup.logger.name):
        prepare_engine_args(args, POLICY)
    assert adjustment_warnings(caplog) == {}
    # A block size or token limit the user chose stays.
    assert args.block_size == 64 and args.max_num_batched_tokens == 1 << 20


def test_enforce_eager_is_left_to_vllm(model_dir: str, unset_reserved_cpus: None) -> None:
    # The plugin gives `--enforce-eager` no default of its own, either way.
    for eager in (False, True):
        args = EngineArgs(model=model_dir, enforce_eager=eager)
        prepare_engine_args(args, POLICY)
        assert args.enforce_eager is eager


def test_a_quantised_kv_cache_is_refused_with_a_policy(model_dir: str) -> None:
    args = EngineArgs(model=model_dir, kv_cache_dtype="fp8")
    with pytest.raises(setup.UnsupportedWithPolicyError, match="--kv-cache-dtype fp8"):
        prepare_engine_args(args, POLICY)


def test_pipeline_parallelism_is_refused_with_a_policy(model_dir: str) -> None:
    args = EngineArgs(model=model_dir, pipeline_parallel_size=2)
    with pytest.raises(setup.UnsupportedWithPolicyError,
                       match="--pipeline-parallel-size 2 is not supported"):
        prepare_engine_args(args, POLICY)
