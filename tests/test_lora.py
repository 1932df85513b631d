"""LoRA (model/lora.py): flags, wrapping, what trains, what is saved, merged model, resume.

Unit tests build the peft model directly; integration tests run `train_dft.main` on the tiny model.
The 2-process ZeRO-3 run is in test_lora_distributed.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, HfArgumentParser

import train_dft
from dftune.model.lora import LoraArguments, LoraConfigError, apply_lora, save_merged_model

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ADAPTER_FILE = "adapter_model.safetensors"


class TrainingFlags:
    """The two TrainingArguments fields apply_lora reads."""

    def __init__(self, loss_impl="full", gradient_checkpointing=False):
        self.loss_impl = loss_impl
        self.gradient_checkpointing = gradient_checkpointing


def expected_lora_params(config, r: int, modules: tuple[str, ...]) -> int:
    """r * (in + out) per adapted linear layer, from the shapes of a Qwen2 block (hand-derived)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }
    return config.num_hidden_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


ALL_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sample_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def logits_of(model, input_ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def base_plus_adapter(tiny_model_dir: str, adapter_dir: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)


# ---- arguments ------------------------------------------------------------------------------------
def parse_lora(*argv: str) -> LoraArguments:
    (args,) = HfArgumentParser(LoraArguments).parse_args_into_dataclasses(args=list(argv))
    return args


def test_defaults_target_all_linear_and_commas_split():
    assert parse_lora().peft_target_modules() == "all-linear"
    assert parse_lora("--lora_target_modules", "q_proj,v_proj", "o_proj").peft_target_modules() == ["q_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--use_lora", "--lora_r", "0"], "--lora_r"),
        (["--use_lora", "--lora_alpha", "0"], "--lora_alpha"),
        (["--use_lora", "--lora_dropout", "1"], "--lora_dropout"),
        (["--merge_lora_on_save"], "--use_lora"),
        (["--use_lora", "--lora_target_modules", "all-linear", "lm_head"], "--lora_target_modules"),
    ],
)
def test_bad_lora_flags_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        parse_lora(*argv)


# ---- wrapping -------------------------------------------------------------------------------------
def test_default_targets_every_attention_and_mlp_linear_but_not_the_head(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = apply_lora(model, parse_lora("--use_lora"), TrainingFlags())
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == set(ALL_BLOCK_LINEARS)
    count = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert count == expected_lora_params(model.config, 8, ALL_BLOCK_LINEARS) == 16384


def test_lm_head_adapter_with_chunked_loss_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = parse_lora("--use_lora", "--lora_target_modules", "q_proj", "lm_head")
    with pytest.raises(LoraConfigError) as err:
        apply_lora(model, args, TrainingFlags(loss_impl="chunked"))
    message = str(err.value)
    assert "\n" not in message and "--lora_target_modules" in message and "--loss_impl full" in message


def test_unknown_target_module_names_the_flag(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(LoraConfigError, match="--lora_target_modules no_such_proj"):
        apply_lora(model, parse_lora("--use_lora", "--lora_target_modules", "no_such_proj"), TrainingFlags())


def test_merged_model_with_adapter_on_tied_lm_head_is_saved_untied(tiny_model_dir, tmp_path):
    """The tiny model ties lm_head to the embeddings; an adapter on the head must not leak into them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = apply_lora(model, parse_lora("--use_lora", "--lora_target_modules", "q_proj", "lm_head", "--lora_dropout", "0"), TrainingFlags())
    with torch.no_grad():  # lora_B starts at zero; make the adapters do something
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ids = sample_ids(model.config.vocab_size)
    expected = logits_of(peft_model, ids)
    merged_dir = save_merged_model(peft_model, str(tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not merged.config.tie_word_embeddings
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(merged.get_input_embeddings().weight, base.get_input_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=0, atol=1e-5)
    assert (expected - logits_of(base, ids)).abs().max() > 1e-2
    assert peft_model.get_base_model().config.tie_word_embeddings  # the training model's config is untouched


# ---- integration: train_dft.main ---------------------------------------------------------------------
@pytest.fixture
def spy_trainer(monkeypatch):
    """Keeps the DFTTrainer that train_dft.main builds, to inspect the trained model in memory."""
    built = []

    class RecordedTrainer(train_dft.DFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_dft, "DFTTrainer", RecordedTrainer)
    return built


def lora_argv(model_dir, data_file, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--data_files", data_file, "--output_dir", str(output_dir),
        "--use_lora", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "4", "--max_length", "128", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "True", "--seed", "7", *extra,
    ]


@pytest.mark.integration
def test_lora_run_trains_only_adapters_and_merged_model_matches(tiny_model_dir, sample_files, tmp_path, spy_trainer):
    out = tmp_path / "run"
    summary = train_dft.main(
        lora_argv(tiny_model_dir, sample_files[0], out, "--max_steps", "3", "--save_steps", "3", "--merge_lora_on_save", "--loss_impl", "full")
    )
    assert summary["steps"] == 3

    # Only the adapters changed: every base weight is bitwise the one on disk.
    peft_model = spy_trainer[0].model
    original = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    base_state = {
        key.replace(".base_layer", ""): value
        for key, value in peft_model.get_base_model().state_dict().items()
        if ".lora_" not in key
    }
    for key, value in original.items():
        assert torch.equal(base_state[key], value), key
    lora_b = [p for name, p in peft_model.named_parameters() if ".lora_B." in name]
    assert len(lora_b) == 14 and all(p.abs().max() > 0 for p in lora_b)  # zero at init: every adapter trained

    # The trainable parameter count is in the run's log file.
    log = (out / "logs" / "train.log").read_text()
    assert "trainable parameters: 16384 of 131520" in log

    # Checkpoints and the output hold adapters in peft format, not full models.
    for directory in (out, out / "checkpoint-3"):
        assert (directory / ADAPTER_FILE).is_file() and (directory / "adapter_config.json").is_file()
        assert not (directory / "model.safetensors").exists()
    saved = load_file(str(out / ADAPTER_FILE))
    assert len(saved) == 28

    # merged/ loads with plain transformers (tied embeddings kept) and equals base + adapter.
    for directory in (out, out / "checkpoint-3"):
        assert not (directory / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    ids = sample_ids(merged.config.vocab_size)
    expected = logits_of(base_plus_adapter(tiny_model_dir, str(out)), ids)
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=0, atol=1e-5)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changed the model


@pytest.mark.integration
def test_resume_from_lora_checkpoint_with_chunked_loss_and_reentrant_checkpointing(tiny_model_dir, sample_files, tmp_path, spy_trainer):
    """Reentrant gradient checkpointing needs the embedding output to require grad, else the adapters
    inside checkpointed layers get no gradient; resuming at step 2 of 4 ends with the adapters of the
    uninterrupted run."""
    extra = [
        "--max_steps", "4", "--save_steps", "2", "--loss_impl", "chunked", "--lora_dropout", "0",
        "--enable_gradient_checkpointing", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}',
    ]
    full_run = tmp_path / "full"
    train_dft.main(lora_argv(tiny_model_dir, sample_files[0], full_run, *extra))
    assert spy_trainer[0].loss_impl == "chunked"
    assert all(p.abs().max() > 0 for name, p in spy_trainer[0].model.named_parameters() if ".lora_B." in name)

    resumed = tmp_path / "resumed"
    train_dft.main(lora_argv(tiny_model_dir, sample_files[0], resumed, *extra, "--resume_from_checkpoint", str(full_run / "checkpoint-2")))
    assert spy_trainer[1].state.global_step == 4
    expected, got = load_file(str(full_run / ADAPTER_FILE)), load_file(str(resumed / ADAPTER_FILE))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    at_checkpoint = load_file(str(full_run / "checkpoint-2" / ADAPTER_FILE))
    assert any(not torch.equal(at_checkpoint[key], got[key]) for key in got)  # it trained past step 2


@pytest.mark.integration
def test_lm_head_adapter_with_chunked_loss_exits_2_with_one_line(tiny_model_dir, sample_files, tmp_path, capsys):
    argv = lora_argv(tiny_model_dir, sample_files[0], tmp_path, "--max_steps", "1", "--loss_impl", "chunked",
                     "--lora_target_modules", "q_proj,lm_head")
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(argv)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--lora_target_modules" in error_lines[0]
