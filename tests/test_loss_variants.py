"""The variant table (dftune/loss/variants.py) is the one place a loss variant is defined: a toy variant added
as one entry gets its flag, defaults, checks, resume setting, help and exact loss on both paths; and the
library API (`make_compute_loss_func`) gives a plain transformers.Trainer the same loss as DFTTrainer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dftune.loss import loss_spec_for, make_compute_loss_func
from dftune.loss.chunked import dft_loss_from_hidden
from dftune.loss.core import IGNORE_INDEX, LossSpec, dft_loss_from_logits
from dftune.loss.variants import LOSS_VARIANTS, LossVariant, VariantFlag, loss_type_help, resolve_variant_flags

from helpers import ROOT, SAMPLE_FILES, TINY_MODEL, child_env

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

# The toy variant, as its author would add it to LOSS_VARIANTS: w = sg(p ^ toy_power).
TOY_ENTRY = """LossVariant(
    "toy", "w = sg(p ^ --toy_power)", lambda p, logits, spec: p.pow(spec.param("toy_power")),
    flags=(VariantFlag("toy_power", float, 0.5, "Exponent of the toy weight (default 0.5).",
                       check=lambda v: None if v > 0 else f"must be > 0, got {v}"),),
)"""


@pytest.fixture
def toy_variant(monkeypatch):
    entry = eval(TOY_ENTRY, {"LossVariant": LossVariant, "VariantFlag": VariantFlag})
    monkeypatch.setitem(LOSS_VARIANTS, "toy", entry)
    return entry


def toy_reference(logits: torch.Tensor, labels: torch.Tensor, power: float, n: float):
    """float64 autograd: sum_t sg(p_t ^ power) * CE_t / n over the shifted supervised tokens."""
    logits = logits.detach().double().requires_grad_(True)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    mask = targets != IGNORE_INDEX
    log_p = torch.log_softmax(logits[mask], dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    loss = -(log_p.exp().pow(power).detach() * log_p).sum() / n
    loss.backward()
    return loss.detach(), logits.grad


def random_batch(seed: int = 0, vocab: int = 11):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 7, vocab, generator=generator) * 3
    labels = torch.randint(0, vocab, (2, 7), generator=generator)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    return logits, labels


def test_toy_variant_is_exact_on_both_paths(toy_variant):
    logits, labels = random_batch()
    spec = loss_spec_for("toy", toy_power=0.25)
    assert spec.param("toy_power") == 0.25 and spec.options == (("toy_power", 0.25),)
    ref_loss, ref_grad = toy_reference(logits, labels, 0.25, n=13)

    full_logits = logits.clone().requires_grad_(True)
    full = dft_loss_from_logits(full_logits, labels, spec, num_items_in_batch=13)
    full.loss.backward()
    torch.testing.assert_close(full.loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(full_logits.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)

    # Chunked: logits = hidden @ W^T, so the reference gradient w.r.t. hidden is ref_grad @ W.
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 5, generator=generator, requires_grad=True)
    weight = torch.randn(11, 5, generator=generator)
    ref_loss, ref_grad = toy_reference(hidden @ weight.t(), labels, 0.25, n=13)
    chunked = dft_loss_from_hidden(hidden, weight, labels, spec, num_items_in_batch=13, chunk_size=3)
    chunked.loss.backward()
    torch.testing.assert_close(chunked.loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hidden.grad.double(), ref_grad @ weight.double(), rtol=1e-5, atol=1e-6)


def test_toy_variant_flags_come_from_its_entry(toy_variant):
    assert "toy: w = sg(p ^ --toy_power)" in loss_type_help()
    assert resolve_variant_flags("toy", {})["toy_power"] == 0.5  # its default
    assert resolve_variant_flags("dft", {})["toy_power"] is None
    with pytest.raises(ValueError, match=r"--toy_power is used by --loss_type toy only \(got --loss_type dft\)"):
        resolve_variant_flags("dft", {"toy_power": 2.0})
    with pytest.raises(ValueError, match=r"--toy_power must be > 0, got -1.0"):
        resolve_variant_flags("toy", {"toy_power": -1})
    with pytest.raises(ValueError, match=r"--eaft_top_k is used by --loss_type eaft only"):
        loss_spec_for("toy", eaft_top_k=5)


def test_published_variants_keep_their_defaults_and_checks():
    assert loss_spec_for("asft") == LossSpec(loss_type="asft", anchor_kl_coef=0.1, anchor_kl_direction="forward")
    assert loss_spec_for("eaft") == LossSpec(loss_type="eaft", eaft_top_k=20, eaft_power=1.0)
    assert loss_spec_for("sft").dft_alpha == 0.0 and not loss_spec_for("sft").anchored
    with pytest.raises(ValueError, match=r"--anchor_kl_direction must be one of forward, reverse"):
        loss_spec_for("asft", anchor_kl_direction="sideways")
    with pytest.raises(ValueError, match=r"--loss_type sft is --dft_alpha 0"):
        loss_spec_for("sft", dft_alpha=0.5)
    with pytest.raises(ValueError, match=r"--loss_type must be one of dft, sft, asft, eaft, got 'nope'"):
        loss_spec_for("nope")
    with pytest.raises(ValueError, match=r"needs the reference model"):
        make_compute_loss_func("asft")


@pytest.mark.integration
def test_a_toy_variant_entry_is_all_train_dft_needs(tmp_path):
    """One entry added to the table before the CLI is imported: train_dft gets --toy_power, refuses it under
    another loss type (one line, exit 2), trains with it and saves it among the checkpoint's settings."""
    script = tmp_path / "toy_train.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from dftune.loss.variants import LOSS_VARIANTS, LossVariant, VariantFlag
        LOSS_VARIANTS["toy"] = {textwrap.indent(TOY_ENTRY, "        ").strip()}
        import train_dft
        from dftune.run.checkpoints import RESUME_SETTINGS
        assert "toy_power" in RESUME_SETTINGS
        train_dft.main(sys.argv[1:])
    """))
    common = ["--model_name_or_path", str(TINY_MODEL), "--data_files", SAMPLE_FILES[0], "--max_steps", "2",
              "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"]
    refused = subprocess.run([sys.executable, str(script), *common, "--output_dir", str(tmp_path / "a"), "--toy_power", "2"],
                             cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == "error: --toy_power is used by --loss_type toy only (got --loss_type dft)."
    run = subprocess.run([sys.executable, str(script), *common, "--output_dir", str(tmp_path / "b"), "--loss_type", "toy",
                          "--toy_power", "0.25"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((tmp_path / "b" / "run_config.json").read_text())
    assert "loss: LossSpec(loss_type='toy'" in run.stderr and "options=(('toy_power', 0.25),)" in run.stderr
    assert json.dumps(config).count("toy") >= 1


@pytest.mark.integration
def test_plain_transformers_trainer_with_compute_loss_func_equals_dft_trainer(tmp_path, tiny_tokenizer):
    """The library API in a plain transformers.Trainer: the same logged losses and the same weights after
    3 optimizer steps (SGD, gradient accumulation 2, unequal supervised tokens per micro-batch) as DFTTrainer."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from dftune.arguments import DFTTrainingArguments
    from dftune.data.collators import DataCollatorForDFT
    from dftune.data.encoding import tokenize_conversation
    from dftune.trainer import DFTTrainer

    with open(SAMPLE_FILES[0], encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:12]
    rows = [tokenize_conversation(tiny_tokenizer, r["messages"], 256) for r in records]
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=0.05,
                  optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                  report_to=[], save_strategy="no", seed=3, disable_tqdm=True, use_cpu=True)
    results = {}
    for name in ("library", "dft_trainer"):
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
        collator = DataCollatorForDFT(pad_token_id=tiny_tokenizer.pad_token_id)
        if name == "library":
            args = TrainingArguments(output_dir=str(tmp_path / name), **common)
            trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                              compute_loss_func=make_compute_loss_func("dft", dft_alpha=0.7))
        else:
            args = DFTTrainingArguments(output_dir=str(tmp_path / name), dft_alpha=0.7, loss_impl="full", **common)
            trainer = DFTTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results[name] = (losses, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert len(results["library"][0]) == 3
    torch.testing.assert_close(torch.tensor(results["library"][0]), torch.tensor(results["dft_trainer"][0]), rtol=1e-5, atol=1e-7)
    for key, value in results["library"][1].items():
        torch.testing.assert_close(value, results["dft_trainer"][1][key], rtol=1e-5, atol=1e-6, msg=key)
