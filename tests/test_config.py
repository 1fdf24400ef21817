"""KVPolicyConfig and the `--kv-*` CLI shim, without starting vLLM."""

from __future__ import annotations

import argparse

import pytest
import torch

from vllm_entropy_kv.cli import add_kv_arguments, fold_into_additional_config
from vllm_entropy_kv.config import (
    POLICY_PARAMETERS,
    SERVED_POLICIES,
    SERVED_WINDOWS,
    KVPolicyConfig,
    KVPolicyConfigError,
    policies_using,
)
from vllm_entropy_kv.policies import LayerObservation, get_policy


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


@pytest.mark.parametrize("budget", [0, -0.5, 2.5, float("nan"), float("inf")])
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


# The policy parameters among the settings (`POLICY_PARAMETERS`): reachable as flags and
# additional_config keys, validated, and really set on the policy the worker plans with.

NEW_VALUES = {"reach": 8, "chunk_size": 16, "exponent": 0.5, "summary_fraction": 0.25,
              "query_reduce": "max"}


# The server's own defaults where they differ from the policy class's (RULER tuning splits
# chose uniform layer budgets, and a 32-query window whose queries count by their maximum;
# the class keeps the entropy paper's exponent 1, a 16-query window and the sum).
SERVER_DEFAULTS = {"exponent": 0.0, "query_reduce": "max"}


def test_policy_parameter_defaults_are_the_policies_own_but_the_tuned_ones() -> None:
    for setting, param in POLICY_PARAMETERS.items():
        users = policies_using(setting)
        assert users, setting
        for name in users:
            config = KVPolicyConfig(policy=name)
            want = SERVER_DEFAULTS.get(setting, getattr(get_policy(name), param))
            if setting == "window":
                want = SERVED_WINDOWS.get(name, want)
            assert getattr(config.make_policy(), param) == want, (name, setting)
    entropy = get_policy("entropy")
    assert (entropy.exponent, entropy.observation_queries, entropy.query_reduce) == (
        1.0, 16, "sum")


def test_window_defaults_to_the_servers_window_for_each_policy() -> None:
    assert SERVED_WINDOWS == {"entropy": 32, "entropy-merge": 32}
    for name in ("entropy", "entropy-merge", "snapkv", "pyramid", "src"):
        assert KVPolicyConfig(policy=name).window == 32
    # streaming and none look at no attention.
    assert "streaming" not in policies_using("window")


@pytest.mark.parametrize("window", [8, 16, 64, 200])
def test_window_is_the_policys_observation_window_uncapped(window: int) -> None:
    for name in policies_using("window"):
        policy = KVPolicyConfig(policy=name, window=window).make_policy()
        assert policy.observation_queries == window, name


def test_policy_parameters_reach_the_policy_and_others_ignore_them() -> None:
    config = KVPolicyConfig(policy="entropy-merge", window=48, **NEW_VALUES)
    policy = config.make_policy()
    assert policy.observation_queries == 48
    for setting, value in NEW_VALUES.items():
        assert getattr(policy, POLICY_PARAMETERS[setting]) == value, setting
    # snapkv has no `reach` or `summary_fraction`; it still gets the window.
    snapkv = KVPolicyConfig(policy="snapkv", window=48, **NEW_VALUES).make_policy()
    assert snapkv.observation_queries == 48 and not hasattr(snapkv, "reach")


def test_make_policy_is_shared_per_distinct_parameters() -> None:
    a = KVPolicyConfig(policy="entropy", reach=4)
    assert a.make_policy() is KVPolicyConfig(policy="entropy", reach=4, budget=0.5).make_policy()
    assert a.make_policy() is not KVPolicyConfig(policy="entropy", reach=8).make_policy()


def observation(n: int = 256, window: int = 32) -> LayerObservation:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, n, 16, generator=gen)
    return LayerObservation(
        queries=torch.randn(6, window, 16, generator=gen), keys=keys,
        values=torch.randn(2, n, 16, generator=gen), scale=0.25, query_offset=0,
    )


def test_summary_fraction_changes_the_plan() -> None:
    layers = [observation(), observation()]
    budget = KVPolicyConfig().budget_for(32)

    def summaries(fraction: float) -> list[int]:
        policy = KVPolicyConfig(policy="entropy-merge", summary_fraction=fraction).make_policy()
        return [plan.num_summaries for plan in policy.plan(layers, budget)]

    assert summaries(0.0) == [0, 0]
    assert all(s > 0 for s in summaries(0.1))
    assert sum(summaries(0.5)) > sum(summaries(0.1))


@pytest.mark.parametrize(("setting", "bad"), [
    ("reach", 0), ("chunk_size", 0), ("exponent", -1.0), ("exponent", float("inf")),
    ("summary_fraction", 1.5), ("summary_fraction", -0.1), ("window", 0),
    ("query_reduce", "mean"),
])
def test_out_of_range_policy_parameters_name_the_field_and_valid_values(
    setting: str, bad: float
) -> None:
    with pytest.raises(KVPolicyConfigError, match=f"kv_{setting}: .* valid: ") as err:
        KVPolicyConfig(policy="entropy", **{setting: bad})
    assert err.value.field == f"kv_{setting}"


def test_new_flags_parse_validate_and_fold_into_additional_config() -> None:
    argv = ["--kv-policy", "entropy-merge", "--kv-window", "64"]
    for setting, value in NEW_VALUES.items():
        argv += ["--" + "kv-" + setting.replace("_", "-"), str(value)]
    args = _parser().parse_args(argv)
    fold_into_additional_config(args)
    config = KVPolicyConfig.from_additional_config(args.additional_config)
    assert config.window == 64
    for setting, value in NEW_VALUES.items():
        assert args.additional_config["kv_" + setting] == value
        assert getattr(config, setting) == value
    with pytest.raises(argparse.ArgumentError, match="kv_summary_fraction.*valid: "):
        _parser().parse_args(["--kv-summary-fraction", "2"])
    with pytest.raises(argparse.ArgumentError, match="kv_reach.*valid: "):
        _parser().parse_args(["--kv-reach", "0"])


def test_an_unset_window_stays_unset_through_additional_config() -> None:
    # So that every process, and a request choosing another policy, resolves it the same way.
    args = _parser().parse_args(["--kv-policy", "entropy"])
    fold_into_additional_config(args)
    assert args.additional_config["kv_window"] is None
    assert KVPolicyConfig.from_additional_config(args.additional_config).window == 32


def test_every_setting_has_a_flag_with_help() -> None:
    help_text = " ".join(_parser().format_help().split())
    for field in KVPolicyConfig.field_names():
        assert "--kv-" + field.replace("_", "-") in help_text, field
    assert "Default: by policy (entropy, entropy-merge, src, snapkv, pyramid 32)" in help_text
