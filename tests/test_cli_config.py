"""train_dft.py's config files: `train_dft.py run.yaml --max_steps 2` and `--config run.yaml`, the file's
settings as flags and the command line's after them (they win); a broken or missing file is one line, exit 2."""

from __future__ import annotations

import json
import re

import pytest

import train_dft
from dftune.errors import UsageError

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration belongs to that one


@pytest.fixture
def config(tmp_path, tiny_model_dir, sample_files):
    """A YAML run configuration as users write it: a list of data files, an unquoted `no` (YAML 1.1's false)
    and a float without a dot (a string to YAML 1.1)."""
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        f"data_files:\n  - {sample_files[0]}\n  - {sample_files[1]}\n"
        f"output_dir: {tmp_path / 'from-config'}\n"
        "max_steps: 50\nper_device_train_batch_size: 2\nlearning_rate: 2e-5\nsave_strategy: no\n"
        "report_to: none\nlogging_steps: 1\ndisable_tqdm: true\nloss_impl: chunked\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("form", ["positional", "--config", "--config="])
def test_flags_after_a_config_file_override_it(config, tmp_path, sample_files, form):
    """Was `--model_name_or_path is required`: a config file was read only when it was the one argument."""
    given = {"positional": [str(config)], "--config": ["--config", str(config)], "--config=": [f"--config={config}"]}[form]
    model_args, data_args, training_args, *_ = train_dft.parse_args([*given, "--max_steps", "2", "--learning_rate", "0.5"])
    assert training_args.max_steps == 2 and training_args.learning_rate == 0.5  # the command line wins
    assert data_args.data_files == sample_files  # a YAML list is the flag's list
    assert training_args.per_device_train_batch_size == 2 and training_args.loss_impl == "chunked"  # the file's
    assert training_args.save_strategy == "no" and training_args.disable_tqdm is True
    assert training_args.output_dir == str(tmp_path / "from-config")
    # A list flag on the command line replaces the file's list.
    _, data_args, *_ = train_dft.parse_args([*given, "--data_files", sample_files[1]])
    assert data_args.data_files == [sample_files[1]]
    # Without flags the file alone is the configuration, as before; a YAML float without a dot is still a float.
    _, _, training_args, *_ = train_dft.parse_args(given)
    assert training_args.max_steps == 50 and training_args.learning_rate == 2e-5


def test_json_config_file_with_flags(tmp_path, tiny_model_dir, sample_files):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model_name_or_path": tiny_model_dir, "data_files": sample_files[0], "output_dir": str(tmp_path / "o"),
                                "max_steps": 7, "dft_alpha": 0.5}))
    _, data_args, training_args, *_ = train_dft.parse_args([str(path), "--dft_alpha", "0.25"])
    assert data_args.data_files == [sample_files[0]] and training_args.max_steps == 7 and training_args.dft_alpha == 0.25


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.yaml", None, "config file {path}: no such file"),
        ("broken.yaml", "model_name_or_path: [a\nmax_steps: : 2\n", "config file {path}:2: not valid YAML (expected ',' or ']'"),
        ("broken.json", '{"max_steps": 2,\n "dft_alpha": }', "config file {path}:2: not valid JSON (Expecting value)"),
        ("list.yaml", "- max_steps: 2\n", "config file {path}: must hold flag: value settings (a mapping), not a list"),
        ("typo.yaml", "max_step: 2\n", "config file {path}: max_step: not a flag of this command"),
    ],
)
def test_a_broken_or_missing_config_file_is_one_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--config", str(path), "--max_steps", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message.format(path=path)), err
    # The same file as the one argument: the same line (parse_args; main() reads a lone config for --deepspeed first).
    with pytest.raises(UsageError, match="^" + re.escape(message.format(path=path))):
        train_dft.parse_args([str(path)])


def test_config_flag_needs_one_file(config):
    with pytest.raises(UsageError, match=r"^--config needs a file"):
        train_dft.parse_args(["--max_steps", "2", "--config"])
    with pytest.raises(UsageError, match=r"^one config file at a time"):
        train_dft.parse_args([str(config), "--config", str(config)])


@pytest.mark.integration
def test_config_file_run_with_overriding_flags(config, tmp_path):
    out = tmp_path / "override"
    summary = train_dft.main([str(config), "--max_steps", "2", "--output_dir", str(out)])
    assert summary["steps"] == 2
    assert (out / "model.safetensors").is_file() and not (tmp_path / "from-config").exists()
