"""What defines a run of a sweep, so that a rerun of dft-compare reuses a run only when its command would
make the same one (sweep/compare.py, `check_reuse`).

A run's definition is written to its folder (compare_definition.json) before its first launch:

  flags          every flag of its command (model, data, training, loss, seed) as FLAG -> values, without
                 --output_dir, --run_name and --resume_from_checkpoint (where the run is, not what it is)
  files          every file a flag names (data, evaluation files, chat template, DeepSpeed config), and the
                 files in a model or data folder or glob: size, mtime and (files up to HASH_LIMIT) sha256,
                 so that a file rewritten with the same content (scripts/experiment_small.py writes its data
                 on every invocation) is the same and an edited one is not
  loss_defaults  the code's defaults of the loss flags the command leaves out (dftune/arguments.py and the
                 loss type's own flags, dftune/loss/variants.py): a run that relied on a default that
                 has changed since is another run

`changes` compares a recorded definition with the one the command makes now, in words.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

DEFINITION_FILE = "compare_definition.json"
NOT_DEFINING = ("--output_dir", "--run_name", "--resume_from_checkpoint")
# Flags whose folders and globs stand for the files in them (any other folder, e.g. --data_cache_dir, is a
# place the run writes to, compared by its name only).
FOLDER_FLAGS = ("--model_name_or_path", "--data_files", "--eval_data_files", "--eval_generation_files")
# Larger files (model weights) are compared by size and mtime only: hashing gigabytes on every rerun costs
# more than redoing a run that was touched but not changed.
HASH_LIMIT = 256 * 2**20
LOSS_FIELDS = ("loss_type", "dft_alpha", "dft_min_weight", "dft_alpha_warmup_ratio")


def flag_values(tokens: list[str]) -> dict[str, list[str]]:
    """`--max_steps 2 --data_files a b --x=1` -> {"--max_steps": ["2"], "--data_files": ["a", "b"], "--x": ["1"]}.
    A flag given twice keeps its last values, as argparse does."""
    values: dict[str, list[str]] = {}
    current = ""  # a value before any flag (none in a train_dft.py command)
    for token in tokens:
        if token.startswith("--"):
            current, has_value, value = token.partition("=")
            values[current] = [value] if has_value else []
        else:
            values.setdefault(current, []).append(token)
    return values


def _files_under(folder: str) -> list[str]:
    found = []
    for root, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(root, name) for name in sorted(filenames) if not name.startswith(".")]
    return found


def named_files(flags: dict[str, list[str]]) -> list[str]:
    """Every file a flag names, and the files in the folders and globs of FOLDER_FLAGS, in order."""
    paths: list[str] = []
    for flag, values in flags.items():
        for value in values:
            if os.path.isfile(value):
                paths.append(value)
            elif flag in FOLDER_FLAGS:
                for match in sorted(glob.glob(value, recursive=True)) if glob.has_magic(value) else [value]:
                    paths += [match] if os.path.isfile(match) else _files_under(match) if os.path.isdir(match) else []
    return list(dict.fromkeys(os.path.normpath(path) for path in paths))


def file_state(path: str) -> dict[str, int] | None:
    """Size and mtime (None: not there)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, so a sweep hashes a data file once


def file_hash(path: str, state: dict[str, int]) -> str | None:
    """sha256 of a file up to HASH_LIMIT bytes (None for a larger one)."""
    if state["size"] > HASH_LIMIT:
        return None
    key = (os.path.abspath(path), state["size"], state["mtime_ns"])
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def loss_defaults(flags: dict[str, list[str]]) -> dict[str, Any]:
    """The code's defaults of the loss flags that `flags` leave out: dft-train's loss fields and the loss
    type's own flags (the variants table)."""
    from dataclasses import fields

    from dftune.arguments import DFTTrainingArguments
    from dftune.loss.variants import LOSS_VARIANTS

    defaults = {f.name: f.default for f in fields(DFTTrainingArguments) if f.name in LOSS_FIELDS}
    loss_type = (flags.get("--loss_type") or [defaults["loss_type"]])[-1]
    variant = LOSS_VARIANTS.get(loss_type)  # an unknown one: the run itself fails with its own error
    defaults.update({flag.name: flag.default for flag in variant.flags} if variant else {})
    return {name: value for name, value in defaults.items() if f"--{name}" not in flags}


def run_definition(command_flags: list[str]) -> dict[str, Any]:
    """The definition of the run (or evaluation) that `command_flags` make; file states without hashes
    (`write_definition` adds them, `changes` hashes only a file whose mtime moved)."""
    flags = {flag: values for flag, values in flag_values(command_flags).items() if flag not in NOT_DEFINING}
    return {
        "flags": flags,
        "files": {path: file_state(path) for path in named_files(flags)},
        "loss_defaults": loss_defaults(flags),
    }


def write_definition(folder: str, definition: dict[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    files = {}
    for path, state in definition["files"].items():
        files[path] = state and {**state, "sha256": file_hash(path, state)}
    with open(os.path.join(folder, DEFINITION_FILE), "w", encoding="utf-8") as f:
        json.dump({**definition, "files": files}, f, indent=2)


def read_definition(folder: str) -> dict[str, Any] | None:
    """The recorded definition; None when the folder has none (made by a dft-compare before the records)
    or it cannot be read."""
    try:
        with open(os.path.join(folder, DEFINITION_FILE), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("flags"), dict) else None


def same_file(recorded: dict[str, Any] | None, path: str, state: dict[str, int] | None) -> bool:
    """Same size and mtime, or same size and content (a file written again with the same bytes)."""
    if recorded is None or state is None:
        return recorded is None and state is None
    if state["size"] != recorded.get("size"):
        return False
    if state["mtime_ns"] == recorded.get("mtime_ns"):
        return True
    return recorded.get("sha256") is not None and file_hash(path, state) == recorded["sha256"]


def _shown(flag: str, values: list[str]) -> str:
    return " ".join([flag, *values])


def changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a recorded definition and `now`, each as the words after "was made with"
    (`--max_steps 2, now 4`); [] when it is the same run."""
    found = []
    old_flags, new_flags = recorded.get("flags", {}), now["flags"]
    for flag in dict.fromkeys([*old_flags, *new_flags]):
        old, new = old_flags.get(flag), new_flags.get(flag)
        if old == new:
            continue
        if old is None:
            found.append(f"no {flag}, now {_shown(flag, new)}")
        elif new is None:
            found.append(f"{_shown(flag, old)}, now without it")
        else:
            found.append(f"{_shown(flag, old)}, now {' '.join(new) or 'without a value'}")
    flags_differ = bool(found)
    old_files, new_files = recorded.get("files", {}), now["files"]
    for path in dict.fromkeys([*old_files, *new_files]):
        if path in old_files and path in new_files:
            if not same_file(old_files[path], path, new_files[path]):
                found.append(f"{path} as it was then ({'gone' if new_files[path] is None else 'changed'} since)")
        elif not flags_differ:  # a file more or less in a folder (with another flag value, that flag says it)
            found.append(f"{path} as it was then (gone since)" if path in old_files else f"no {path} (added since)")
    old_defaults, new_defaults = recorded.get("loss_defaults", {}), now["loss_defaults"]
    for name in old_defaults:
        if name in new_defaults and old_defaults[name] != new_defaults[name]:
            found.append(f"the code's default --{name} {old_defaults[name]}, now {new_defaults[name]}")
    return found
