"""Flags that used to end in a traceback after the model had loaded (or in a run of 0 steps) are one line naming
the flag and what to do, exit code 2, before the tokenizer or the model loads."""

from __future__ import annotations

import pytest

import train_dft

pytestmark = pytest.mark.unit  # the file's tier: every run here stops before any data or model work


@pytest.fixture
def no_loading(monkeypatch):
    """Any loading means the check came too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer or the model was loaded before the bad flag was reported")

    monkeypatch.setattr(train_dft, "load_tokenizer", refuse)
    monkeypatch.setattr(train_dft, "load_model", refuse)


def run_to_error(tmp_path, tiny_model_dir, sample_files, capsys, extra: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path / "out"),
                        "--report_to", "none", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0].removeprefix("error: ")


@pytest.mark.parametrize(
    "extra, message",
    [
        # Was torch's sampler traceback after the model had loaded.
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0."),
        (["--per_device_eval_batch_size", "-1", "--validation_split_percentage", "10"], "--per_device_eval_batch_size must be >= 1, got -1."),
        # Was a ZeroDivisionError inside Trainer.train().
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0."),
        # Was Trainer's "you didn't pass an eval_dataset" traceback after the model had loaded.
        (["--eval_strategy", "steps"], "--eval_strategy steps has nothing to evaluate: give --eval_data_files, --validation_split_percentage"),
        (["--eval_strategy", "epoch"], "--eval_strategy epoch has nothing to evaluate"),
        # Was "--load_best_model_at_end requires the save and eval strategy to match, ... but found" (cut mid-sentence).
        (["--load_best_model_at_end", "True", "--eval_strategy", "epoch", "--save_strategy", "steps", "--validation_split_percentage", "10"],
         "--load_best_model_at_end needs a checkpoint at every evaluation: --eval_strategy epoch and --save_strategy steps differ; "
         "give both the same (e.g. --save_strategy epoch) or --save_strategy best."),
        # Was accepted and did nothing: no evaluation, no best model.
        (["--load_best_model_at_end", "True"], "--load_best_model_at_end needs evaluations to pick the best checkpoint: give --eval_strategy steps"),
        # Was a run of 0 steps, exit 0.
        (["--num_train_epochs", "0"], "--num_train_epochs 0 trains 0 steps: give --num_train_epochs > 0 (e.g. 1) or --max_steps N."),
    ],
)
def test_bad_step_and_eval_flags_are_one_line_before_loading(tmp_path, tiny_model_dir, sample_files, capsys, no_loading, extra, message):
    assert run_to_error(tmp_path, tiny_model_dir, sample_files, capsys, extra).startswith(message)


def test_the_flags_those_checks_accept(tiny_model_dir, sample_files, prompts_file, tmp_path):
    base = ["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path), "--report_to", "none"]
    assert train_dft.parse_args([*base, "--num_train_epochs", "0", "--max_steps", "3"])[2].max_steps == 3
    for evaluation in (["--validation_split_percentage", "5"], ["--eval_data_files", sample_files[1]], ["--eval_generation_files", prompts_file]):
        assert train_dft.parse_args([*base, "--eval_strategy", "steps", "--eval_steps", "5", *evaluation])[2].eval_steps == 5
    best = [*base, "--eval_data_files", sample_files[1], "--load_best_model_at_end", "True", "--eval_strategy", "steps"]
    assert train_dft.parse_args([*best, "--save_strategy", "steps"])[2].load_best_model_at_end
    assert train_dft.parse_args([*best, "--save_strategy", "best", "--metric_for_best_model", "eval_loss"])[2].load_best_model_at_end


def test_transformers_multi_line_errors_become_one_whole_line(tiny_model_dir, sample_files, tmp_path, monkeypatch):
    """transformers' own argument errors can run over several lines; all of them go into the one line."""
    from dftune.arguments import DFTTrainingArguments
    from dftune.errors import UsageError

    def multi_line(self):
        raise ValueError("--some_flag requires X, but found\n- Evaluation strategy: steps\n- Save strategy: epoch")

    monkeypatch.setattr(DFTTrainingArguments, "_check_loss_flags", multi_line)
    with pytest.raises(UsageError) as error:
        train_dft.parse_args(["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path)])
    assert str(error.value) == "--some_flag requires X, but found - Evaluation strategy: steps - Save strategy: epoch"


@pytest.fixture
def prompts_file(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 2 plus 2?", "answer": "4"}\n', encoding="utf-8")
    return str(path)


# ---- tracker logins ---------------------------------------------------------------------------------------
@pytest.fixture
def no_tracker_login(tmp_path, monkeypatch):
    """A machine where nobody logged in to wandb or swanlab: an empty home and working directory, no variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "WANDB_DIR", "NETRC",
                 "SWANLAB_MODE", "SWANLAB_API_KEY", "SWANLAB_ROOT", "SWANLAB_SAVE_DIR", "SWANLAB_CONFIG_DIR", "SWANLAB_API_HOST"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.mark.parametrize(
    "tracker, message",
    [
        ("wandb", "--report_to wandb: no W&B login found"),
        ("swanlab", "--report_to swanlab: no SwanLab login found"),
    ],
)
def test_a_tracker_without_login_is_one_line_before_loading(tmp_path, tiny_model_dir, sample_files, capsys, no_loading, no_tracker_login,
                                                            tracker, message):
    """Was a login prompt or the tracker's traceback once the model had loaded (in a batch job: no one to answer)."""
    line = run_to_error(tmp_path, tiny_model_dir, sample_files, capsys, ["--report_to", tracker])
    assert line.startswith(message)
    variable = tracker.upper()
    assert f"`{tracker} login`" in line and f"{variable}_API_KEY" in line and f"{variable}_MODE=offline" in line


def test_tracker_logins_that_count(tmp_path, tiny_model_dir, sample_files, no_tracker_login, monkeypatch):
    """The ways each library finds its key (or needs none), as they read them."""
    from dftune.errors import UsageError

    argv = ["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path / "o")]

    def accepted(*trackers: str) -> bool:
        try:
            train_dft.parse_args([*argv, "--report_to", *trackers])
        except UsageError:
            return False
        return True

    assert not accepted("wandb") and not accepted("swanlab") and accepted("tensorboard")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_MODE", "disabled"), ("WANDB_API_KEY", "k" * 40)):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert accepted("wandb"), (name, value)
    netrc = no_tracker_login / ".netrc"
    netrc.write_text("machine example.org login user password other\n")
    assert not accepted("wandb")  # a ~/.netrc without W&B's host
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert accepted("wandb")
    netrc.unlink()
    (no_tracker_login / ".config" / "wandb").mkdir(parents=True)
    (no_tracker_login / ".config" / "wandb" / "settings").write_text("[default]\nmode = offline\n")  # `wandb offline`
    assert accepted("wandb")
    for name, value in (("SWANLAB_MODE", "offline"), ("SWANLAB_MODE", "local"), ("SWANLAB_MODE", "disabled"), ("SWANLAB_API_KEY", "k" * 21)):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert accepted("swanlab"), (name, value)
    (no_tracker_login / ".swanlab").mkdir()
    (no_tracker_login / ".swanlab" / ".netrc").write_text(  # where `swanlab login` saves the key
        "machine https://api.swanlab.cn\n  login https://swanlab.cn\n  password " + "k" * 21 + "\n"
    )
    assert accepted("swanlab")
    (no_tracker_login / ".swanlab" / ".netrc").unlink()
    # Only rank 0 starts tracker runs: the other ranks do not need a login (checked alone: a parse under RANK=1
    # could leave accelerate's process state set for rank 1 in this test process).
    from types import SimpleNamespace

    from dftune.arguments import check_arguments_together

    data_args = SimpleNamespace(eval_data_files=None, validation_split_percentage=0)
    training_args = SimpleNamespace(eval_strategy="no", report_to=["wandb", "swanlab"])
    with pytest.raises(ValueError, match=r"^--report_to (wandb|swanlab): no .* login found"):
        check_arguments_together(data_args, training_args, None)
    monkeypatch.setenv("RANK", "1")
    check_arguments_together(data_args, training_args, None)
