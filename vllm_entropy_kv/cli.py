"""`--kv-policy` and friends on `vllm serve`.

vLLM parses the CLI in the API server after loading general plugins, so the plugin wraps
`EngineArgs.add_cli_args` (adds the argument group) and `EngineArgs.from_cli_args` (folds the
values into `additional_config`, validated, so every process reads the same settings).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from vllm_entropy_kv.config import (
    ADDITIONAL_CONFIG_PREFIX,
    POLICY_PARAMETERS,
    SERVED_POLICIES,
    KVPolicyConfig,
    KVPolicyConfigError,
    default_window,
    policies_using,
)

_WRAPPED_MARK = "_vllm_entropy_kv_wrapped"

FLAG_HELP: dict[str, str] = {
    "policy": "KV cache compression policy; `none` is stock vLLM.",
    "budget": "Prompt KV kept per layer on average: a fraction in (0, 1] or a token count.",
    "sink_tokens": "First prompt tokens always kept (attention sinks).",
    "recent_tokens": "Last prompt tokens always kept.",
    "window": "Observation window: the last prompt queries whose attention scores tokens.",
    "merge_bias": "Give summary tokens (entropy-merge, src) a log(count) attention bias "
    "(true/false).",
    "reach": "A token scores at least as high as the attended tokens up to reach - 1 "
    "positions before it, so a fact's continuation stays with the key a question matched "
    "(1: off).",
    "chunk_size": "Tokens are kept or dropped in chunks of this many positions (1: per token).",
    "exponent": "Layer budgets are proportional to layer entropy ** exponent (0, the "
    "default: uniform; 1: the entropy paper's).",
    "summary_fraction": "Share of each layer's budget spent on summary tokens, in [0, 1] "
    "(0: pure eviction).",
    "query_reduce": "How the window's queries combine into a token's score: sum (SnapKV's) "
    "or max (the query that attends to it most).",
}


def _flag(field: str) -> str:
    return "--kv-" + field.replace("_", "-")


def _validating_type(field: str) -> Callable[[str], Any]:
    """An argparse `type` that converts and range-checks one field through KVPolicyConfig."""

    def convert(raw: str) -> Any:
        try:
            return getattr(KVPolicyConfig.from_mapping({field: raw}), field)
        except KVPolicyConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = field
    return convert


def _default_text(field: str, defaults: KVPolicyConfig) -> str:
    """The help's "Default: ..." and, for policy parameters, the policies that read them."""
    if field == "window":
        by_window: dict[int, list[str]] = {}
        for name in policies_using(field):
            by_window.setdefault(default_window(name), []).append(name)
        own = "; ".join(f"{', '.join(names)} {window}" for window, names in by_window.items())
        return f"Default: by policy ({own})."
    text = f"Default: {getattr(defaults, field)}."
    if field in POLICY_PARAMETERS:
        text += f" Read by: {', '.join(policies_using(field))}."
    return text


def add_kv_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = KVPolicyConfig(policy=SERVED_POLICIES[0])
    group = parser.add_argument_group(
        title="KVCompressionConfig",
        description="KV cache compression (vllm-entropy-kv). "
        "Each flag is also settable as --additional-config.kv_<name> <value>.",
    )
    for field in KVPolicyConfig.field_names():
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": f"{FLAG_HELP[field]} {_default_text(field, defaults)}",
        }
        if field == "policy":
            kwargs["choices"] = list(SERVED_POLICIES)
        else:
            kwargs["type"] = _validating_type(field)
        group.add_argument(_flag(field), dest=f"kv_{field}", **kwargs)
    return parser


def fold_into_additional_config(args: argparse.Namespace) -> None:
    """Merge the `--kv-*` values into `args.additional_config`, validated and complete."""
    additional = dict(getattr(args, "additional_config", None) or {})
    for field in KVPolicyConfig.field_names():
        value = getattr(args, f"kv_{field}", None)
        if value is not None:
            additional[ADDITIONAL_CONFIG_PREFIX + field] = value
    config = KVPolicyConfig.from_additional_config(additional)
    additional.update(config.to_additional_config())
    args.additional_config = additional


def install_cli_shim() -> None:
    """Wrap EngineArgs' CLI hooks once per process (plugins may be loaded repeatedly)."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, _WRAPPED_MARK, False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        return add_kv_arguments(original_add(parser, *args, **kwargs))

    @functools.wraps(original_from)
    def from_cli_args(cls, args: argparse.Namespace):
        try:
            fold_into_additional_config(args)
        except KVPolicyConfigError as e:
            # Same shape as argparse's errors: a message and a non-zero exit, no traceback.
            raise SystemExit(f"vllm serve: error: {e}") from None
        return original_from(cls, args)

    setattr(add_cli_args, _WRAPPED_MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
