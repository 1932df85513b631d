"""dist_logger: levels per rank, the `[rank r/world]` prefix on every line, library loggers routed
through the same handlers, metrics through logging. (The 2-process line count is in test_distributed.)"""

from __future__ import annotations

import logging
import re

import datasets
import pytest
import transformers

import dist_logger

from helpers import LOG_LINE

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, transformers.utils.logging.get_verbosity())
    saved_datasets = datasets.utils.logging.get_verbosity()
    saved_bars = (datasets.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled())
    yield
    datasets.utils.logging.set_verbosity(saved_datasets)
    for library, enabled in zip((datasets.utils.logging, transformers.utils.logging), saved_bars):
        if enabled:
            library.enable_progress_bar()
        else:
            library.disable_progress_bar()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in saved[0]:
            handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    transformers.utils.logging.set_verbosity(saved[2])
    logging.captureWarnings(False)


def test_rank0_logs_info_to_console_and_file(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger = dist_logger.setup_logging(str(tmp_path / "logs"))
    logger.info("hello %s", "world")
    transformers.utils.logging.get_logger("transformers.trainer").info("from transformers")
    logging.getLogger("DeepSpeed").info("from deepspeed")
    logging.getLogger("datasets").info("from datasets")
    logger.info("first line\nsecond line")
    err = capsys.readouterr().err.splitlines()
    file_lines = (tmp_path / "logs" / "train.log").read_text().splitlines()
    assert err == file_lines  # each line once in each sink, the same lines
    assert len(err) == 6
    assert all(LOG_LINE.match(line) and " INFO [rank 0/2] " in line for line in err)
    assert [line.split(": ", 1)[1] for line in err] == [
        "hello world", "from transformers", "from deepspeed", "from datasets", "first line", "second line"
    ]


def test_other_ranks_only_warn_and_write_no_file(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger = dist_logger.setup_logging(str(tmp_path / "logs"))
    logger.info("not shown")
    transformers.utils.logging.get_logger("transformers.trainer").info("not shown either")
    logging.getLogger("DeepSpeed").info("nor this")
    logger.warning("shown")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.search(r" WARNING \[rank 1/2\] dft: shown$", err[0])
    assert not (tmp_path / "logs").exists()
    # No progress bar of any library on other ranks (model loading, tokenisation): rank 0's is the run's.
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not datasets.utils.logging.is_progress_bar_enabled()


def test_traceback_lines_carry_the_prefix(monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    logger = dist_logger.setup_logging()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    err = capsys.readouterr().err.splitlines()
    assert len(err) > 3 and all(line.startswith(err[0][:19]) and "ERROR [rank 0/1] dft: " in line for line in err)
    assert err[-1].endswith("RuntimeError: boom")


def test_python_warnings_become_prefixed_log_lines(monkeypatch, capsys, restore_logging):
    import warnings

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist_logger.setup_logging()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert re.search(r" WARNING \[rank 1/2\] py.warnings: .*FutureWarning: deprecated thing", err)


@pytest.mark.parametrize(
    "rank, log_level, log_level_replica, expected",
    [("0", "passive", "warning", logging.WARNING), ("0", "info", "warning", logging.INFO), ("0", "warning", "warning", logging.WARNING),
     ("0", "debug", "warning", logging.DEBUG), ("1", "passive", "info", logging.WARNING),
     ("1", "passive", "error", logging.ERROR), ("1", "debug", "passive", logging.WARNING)],
)
def test_library_log_level_follows_hf_flags_and_replicas_only_warn(monkeypatch, rank, log_level, log_level_replica, expected):
    """The default (passive) is WARNING on every rank: the libraries' INFO is config dumps and banners."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist_logger.library_log_level(log_level, log_level_replica) == expected


@pytest.mark.integration
def test_library_info_lines_only_with_log_level_info(tmp_path, tiny_model_dir, sample_files, monkeypatch, capsys, restore_logging):
    """The demo's console was half transformers' model-config dumps (93 of 182 lines); `--log_level info` brings them back."""
    import train_dft

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = ["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "True"]
    train_dft.main(args + ["--output_dir", str(tmp_path / "default")])
    err = capsys.readouterr().err
    assert "transformers.configuration_utils:" not in err and "transformers.trainer:" not in err
    assert "dft: data report" in err and "dft: step 1/1:" in err  # the run's own lines stay
    # In place of transformers' "***** Running training *****" block: one line.
    assert "dft: training 1 step, 2 sequences a step (2 per device x 1 accumulated x 1 process)" in err
    train_dft.main(args + ["--output_dir", str(tmp_path / "info"), "--log_level", "info"])
    err = capsys.readouterr().err
    assert "transformers.configuration_utils: loading configuration file" in err and "transformers.trainer:" in err


def test_deepspeed_cpu_notice_is_dropped_and_its_other_lines_kept():
    """DeepSpeed's "Setting accelerator to CPU" line, printed on every CPU run in its own format, is filtered from
    its logger (dftune.run.logs installs the filter when imported); its other lines pass."""
    import dftune.run.logs  # noqa: F401  (installs the filter)

    deepspeed_logger = logging.getLogger("DeepSpeed")

    def passes(message: str) -> bool:
        return bool(deepspeed_logger.filter(deepspeed_logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, message, (), None)))

    assert not passes("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    assert not passes("Setting ds_accelerator to cpu (auto detect)")
    assert passes("Setting accelerator to xpu: forced by DS_ACCELERATOR") and passes("ZeRO-3 partitioned 12 parameters")


@pytest.mark.integration
def test_importing_deepspeed_after_train_dft_prints_no_accelerator_line():
    import subprocess
    import sys

    import torch

    from helpers import ROOT, child_env

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed finds the GPU here: it prints no CPU notice")
    for code, notice in (("import deepspeed", True), ("import train_dft, deepspeed", False)):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("Setting accelerator to CPU" in result.stdout + result.stderr) is notice, (code, result.stdout, result.stderr)


def test_metrics_line_is_compact_and_ordered():
    line = dist_logger.format_metrics({"learning_rate": 1e-3, "avg_p_correct": 0.123456789, "loss": 0.5, "dft_alpha": 1.0, "step_name": "x"})
    assert line == "loss 0.5 | avg_p_correct 0.123457 | learning_rate 0.001 | dft_alpha 1 | step_name x"
