"""EngineArgs' command-line flags (vLLM's EngineArgs.add_cli_args): one per field, in vLLM's --kebab-case
names, typed from the field's annotation; JSON for dict settings, and vLLM's dotted form for one key of a
config flag (--structured-outputs-config.backend xgrammar)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from plexus.core.config import StructuredOutputsConfig


def add_engine_flags(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field]) -> argparse.ArgumentParser:
    for f in fields:
        if f.name.startswith("_"):      # vLLM's internal fields have no flag
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "served_model_name":
            parser.add_argument(flag, nargs="+", default=f.default)
        elif f.name == "hf_token":      # vLLM's --hf-token alone means True: the stored login's token
            parser.add_argument(flag, nargs="?", const=True, default=f.default)
        elif f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif "dict" in f.type:        # vLLM's JSON flags: --override-neuron-config '{"cast_logits_dtype": ...}'
            parser.add_argument(flag, type=_json_arg, default=f.default)
        elif f.type.startswith("list["):
            parser.add_argument(flag, nargs="+", type=int if f.type.startswith("list[int]") else str,
                                default=f.default)
        else:
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default)
    # vLLM's dotted form of one key of a config flag: --structured-outputs-config.backend xgrammar
    for key in (f.name for f in dataclasses.fields(StructuredOutputsConfig)):
        is_bool = key in StructuredOutputsConfig.BOOLS
        parser.add_argument(f"--structured-outputs-config.{key.replace('_', '-')}",
                            dest="structured_outputs_config",
                            action=_ConfigKey, key=key, type=_bool_arg if is_bool else str,
                            nargs="?" if is_bool else None, const=True if is_bool else None,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser



class _ConfigKey(argparse.Action):
    """One key of a dict-valued flag, set into that flag's dict (--structured-outputs-config.backend x)."""

    def __init__(self, option_strings, dest, key: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), self.key: values})


def _bool_arg(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
