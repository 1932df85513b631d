"""Config files for train_dft.py: `train_dft.py run.yaml [flags]` or `--config run.yaml`, the file's values
turned into flags placed before the command line's, so flags given after it win (HfArgumentParser's own
parse_yaml_file takes no other flags)."""

from __future__ import annotations

import dataclasses
import json
import os
import typing

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def split_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the config file, the other arguments): a first argument ending in .json/.yaml/.yml, or `--config FILE`.

    Raises:
        ValueError: --config without a file, or two config files.
    """
    files, rest = [], []
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        files.append(argv[0])
        argv = argv[1:]
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            path = next(args, None)
            if path is None or path.startswith("--"):
                raise ValueError("--config needs a file: --config run.yaml (a .yaml or .json file of flag: value settings).")
            files.append(path)
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if len(files) > 1:
        raise ValueError(f"one config file at a time, got {' and '.join(files)}; give the other settings as flags.")
    return (files[0] if files else None), rest


def read_config_file(path: str) -> dict[str, typing.Any]:
    """The settings of a .json file, or of a YAML file (any other name), as a dict.

    Raises:
        ValueError: a missing or unreadable file, a syntax error (with its line), or not a mapping.
    """
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config file {path}: no such file; give the path of a .yaml or .json file of flag: value settings.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path}: cannot be read ({err}).") from None
    if path.endswith(".json"):
        try:
            config = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path}:{err.lineno}: not valid JSON ({err.msg}); fix that line.") from None
    else:
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {path}{where}: not valid YAML ({problem}); fix that line.") from None
    if config is None:  # an empty file
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"config file {path}: must hold flag: value settings (a mapping), not a {type(config).__name__}.")
    return config


def _field_types(dataclass_types) -> dict[str, typing.Any]:
    """Every flag the parser knows (the dataclasses' init fields), with its type."""
    types: dict[str, typing.Any] = {}
    for dtype in dataclass_types:
        try:
            hints = typing.get_type_hints(dtype)
        except Exception:  # a type that does not resolve: the name is still a flag
            hints = {}
        types.update({f.name: hints.get(f.name) for f in dataclasses.fields(dtype) if f.init})
    return types


def _config_value_as_flag(name: str, value, flag_type) -> list[str]:
    if value is None:  # `key: null`: the flag's default
        return []
    if isinstance(value, bool) and bool not in (typing.get_args(flag_type) or (flag_type,)) and value is False:
        value = "no"  # YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` means the strategy "no"
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)] if value else []
    # --flag=value: a value starting with "-" (a negative number) stays the flag's value.
    return [f"--{name}={json.dumps(value) if isinstance(value, dict) else value}"]


def expand_config_file(argv: list[str], dataclass_types) -> list[str]:
    """`train_dft.py run.yaml --max_steps 2` or `--config run.yaml ...` as plain flags: the file's settings first,
    then the command line's, so that a flag given on the command line wins (argparse keeps a flag's last value).
    List settings (data_files: [a.jsonl, b.json]) become a flag with several values; mappings, JSON text.

    Raises:
        ValueError: a missing or broken config file, or a setting that is not a flag (named).
    """
    path, rest = split_config_file(argv)
    if path is None:
        return list(argv)
    config = read_config_file(path)
    types = _field_types(dataclass_types)
    unknown = [str(name) for name in config if name not in types]
    if unknown:
        raise ValueError(f"config file {path}: {', '.join(unknown)}: not a flag of this command (see --help); fix or remove it.")
    flags = [token for name, value in config.items() for token in _config_value_as_flag(name, value, types[name])]
    return flags + rest
