"""KVPolicyConfig and the `--kv-*` CLI shim, without starting vLLM."""

from __future__ import annotations

import argparse

import pytest

from vllm_entropy_kv.cli import add_kv_arguments, fold_into_additional_config
from vllm_entropy_kv.config import SERVED_POLICIES, KVPolicyConfig, KVPolicyConfigError


def test_defaults_are_valid_and_stock() -> None:
    config = KVPolicyConfig()
    assert config.policy == "none" and not config.enabled
    assert 0 < config.budget <= 1


def test_unknown_policy_names_valid_values() -> None:
    with pytest.raises(KVPolicyConfigError) as err:
        KVPolicyConfig(policy="bogus")
    for name in SERVED_POLICIES:
        assert name in str(err.value)
    assert "kv_policy" in str(err.value)


@pytest.mark.parametrize("budget", [0, -0.5, 2.5, float("nan")])
def test_out_of_range_budget(budget: float) -> None:
    with pytest.raises(KVPolicyConfigError, match="kv_budget"):
        KVPolicyConfig(budget=budget)


@pytest.mark.parametrize("budget", [0.1, 1.0, 512])
def test_valid_budgets(budget: float) -> None:
    assert KVPolicyConfig(budget=budget).budget == budget


def test_negative_counts_rejected() -> None:
    with pytest.raises(KVPolicyConfigError, match="kv_sink_tokens"):
        KVPolicyConfig(sink_tokens=-1)
    with pytest.raises(KVPolicyConfigError, match="kv_window"):
        KVPolicyConfig(window=0)


def test_from_mapping_converts_strings_and_rejects_unknown_keys() -> None:
    config = KVPolicyConfig.from_mapping({"budget": "0.5", "sink_tokens": "8"})
    assert config.budget == 0.5 and config.sink_tokens == 8
    with pytest.raises(KVPolicyConfigError, match="not a valid int"):
        KVPolicyConfig.from_mapping({"sink_tokens": "many"})
    with pytest.raises(KVPolicyConfigError, match="unknown KV policy setting"):
        KVPolicyConfig.from_mapping({"budgett": 0.5})


def test_additional_config_round_trip_ignores_other_keys() -> None:
    config = KVPolicyConfig(budget=0.5, recent_tokens=64)
    additional = {**config.to_additional_config(), "unrelated_key": 1}
    assert KVPolicyConfig.from_additional_config(additional) == config
    assert KVPolicyConfig.from_additional_config(None) == KVPolicyConfig()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--additional-config", type=dict, default=None)
    return add_kv_arguments(parser)


def test_flags_fold_into_additional_config() -> None:
    args = _parser().parse_args(["--kv-policy", "none", "--kv-budget", "0.5"])
    args.additional_config = {"other": True}
    fold_into_additional_config(args)
    assert args.additional_config["kv_policy"] == "none"
    assert args.additional_config["kv_budget"] == 0.5
    assert args.additional_config["other"] is True
    assert KVPolicyConfig.from_additional_config(args.additional_config).budget == 0.5


def test_flags_override_additional_config_and_absent_flags_do_not() -> None:
    args = _parser().parse_args([])
    args.additional_config = {"kv_budget": 0.75}
    fold_into_additional_config(args)
    assert args.additional_config["kv_budget"] == 0.75
    args = _parser().parse_args(["--kv-budget", "0.1"])
    args.additional_config = {"kv_budget": 0.75}
    fold_into_additional_config(args)
    assert args.additional_config["kv_budget"] == 0.1


def test_invalid_flag_values_fail_at_parse_time() -> None:
    with pytest.raises(argparse.ArgumentError, match="kv_budget"):
        _parser().parse_args(["--kv-budget", "1.5"])
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        _parser().parse_args(["--kv-policy", "bogus"])


def test_invalid_additional_config_is_reported() -> None:
    args = _parser().parse_args([])
    args.additional_config = {"kv_policy": "bogus"}
    with pytest.raises(KVPolicyConfigError, match="valid: "):
        fold_into_additional_config(args)
