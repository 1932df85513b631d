"""Integration: train_dft.main on tiny random-init models of the real Llama-3.2 vocabulary (128K), whose
tokenizer has no pad token, and as a base model with no chat template and no ChatML tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dftune.cli.evaluate as evaluate_cli
import train_dft
from data_utils import DataCollatorForDFT
from dftune.data.packing import DataCollatorForPacking

from helpers import tiny_model_for

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

DATA = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {a}?"}, {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."}]}
    for a in range(12)
]


def write_data(tmp_path) -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in DATA))
    return str(path)


def train(model_dir: str, data: str, out, *extra: str) -> dict:
    return train_dft.main([
        "--model_name_or_path", model_dir, "--data_files", data, "--output_dir", str(out), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none", "--disable_tqdm", "True",
        "--max_length", "128", "--logging_steps", "1", "--save_strategy", "no", "--data_cache_dir", "none", *extra,
    ])


@pytest.mark.parametrize("collator", [DataCollatorForDFT, DataCollatorForPacking])
def test_collators_refuse_a_missing_pad_id_with_what_to_do(collator):
    with pytest.raises(ValueError, match="pad_token_id must be a token id, got None: give the tokenizer a pad token"):
        collator(pad_token_id=None)


@pytest.mark.integration
def test_tokenizer_without_pad_token_trains(tmp_path, real_tokenizer_dirs):
    # Stock Llama-3.2: no pad token; before the fix the first batch died in torch.full(fill_value=None).
    model_dir = tiny_model_for(real_tokenizer_dirs["llama3.2"], str(tmp_path / "model"), tie=False)
    summary = train(model_dir, write_data(tmp_path), tmp_path / "out")
    assert summary["first_loss"] > 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.pad_token == "<|finetune_right_pad_id|>"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.pad_token_id == saved.pad_token_id


@pytest.mark.integration
@pytest.mark.parametrize("use_lora", [False, True])
def test_base_model_without_chatml_tokens_learns_the_end_of_turn(tmp_path, real_tokenizer_dirs, use_lora):
    model_dir = tiny_model_for(real_tokenizer_dirs["llama3.2"], str(tmp_path / "model"), tie=False)
    (tmp_path / "model" / "chat_template.jinja").unlink()  # a base model: no template, no <|im_end|>
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = base.get_input_embeddings().weight.shape[0]
    out = tmp_path / "out"
    train(model_dir, write_data(tmp_path), out, *(["--use_lora", "--lora_r", "2"] if use_lora else []))
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == rows + 1 and "<|im_end|>" in tokenizer.all_special_tokens
    if use_lora:
        # The new rows are trained and saved with the adapter (peft trainable_token_indices), input and head.
        adapter = load_file(out / "adapter_model.safetensors")
        deltas = {name: value for name, value in adapter.items() if "trainable_tokens_delta" in name}
        assert {name.split(".")[-3] for name in deltas} == {"embed_tokens", "lm_head"}
        for delta in deltas.values():
            assert delta.shape == (2, base.config.hidden_size) and torch.count_nonzero(delta) > 0
        # peft saves no generation config: the adapter's run directory holds one that stops at <|im_end|>.
        from transformers import GenerationConfig

        assert im_end in GenerationConfig.from_pretrained(out).eos_token_id
    else:
        trained = AutoModelForCausalLM.from_pretrained(out)
        assert trained.get_input_embeddings().weight.shape[0] == trained.get_output_embeddings().weight.shape[0] == rows + 2
        assert im_end in trained.generation_config.eos_token_id  # generation stops at the end of a turn


@pytest.mark.integration
def test_evaluate_py_scores_a_lora_adapter_with_added_tokens_and_a_model_without_pad(tmp_path, real_tokenizer_dirs):
    """evaluate.py sets the tokenizer and model up as training does: before the fix the adapter of a base model
    that got <|im_start|>/<|im_end|> died in peft (IndexError: its token rows lie past the base vocabulary), and
    a stock Llama-3.2 (no pad token) with --eval_data_files was refused."""
    from helpers import read_jsonl

    model_dir = tiny_model_for(real_tokenizer_dirs["llama3.2"], str(tmp_path / "model"), tie=False)
    (tmp_path / "model" / "chat_template.jinja").unlink()
    prompts = tmp_path / "gen.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} plus {a}?", "answer": 2 * a}) + "\n" for a in range(3)))
    gen_flags = ["--eval_generation_files", str(prompts), "--eval_generation_max_new_tokens", "6"]
    out = tmp_path / "out"
    train(model_dir, write_data(tmp_path), out, "--use_lora", "--lora_r", "2", *gen_flags)
    evaluate = evaluate_cli
    evaluate.main(["--model_name_or_path", model_dir, "--adapter", str(out), "--output_dir", str(tmp_path / "ev"), *gen_flags])
    scored = read_jsonl(tmp_path / "ev" / "generations" / "step-0.jsonl")
    assert [r["output"] for r in scored] == [r["output"] for r in read_jsonl(out / "generations" / "step-3.jsonl")]

    stock = tiny_model_for(real_tokenizer_dirs["llama3.2"], str(tmp_path / "stock"), tie=False)
    results = evaluate.main(["--model_name_or_path", stock, "--output_dir", str(tmp_path / "ev_stock"),
                             "--eval_data_files", write_data(tmp_path), "--max_length", "128", *gen_flags])
    assert results["metrics"]["eval_ce_loss"] > 0


@pytest.mark.integration
def test_merged_lora_model_holds_the_trained_rows_of_added_tokens(tmp_path, real_tokenizer_dirs):
    """--merge_lora_on_save on a base model that got <|im_start|>/<|im_end|>: the embedding and LM head were saved
    under peft's wrapper keys (token_adapter.base_layer.weight), so AutoModelForCausalLM loaded both as random."""
    from peft import PeftModel

    model_dir = tiny_model_for(real_tokenizer_dirs["llama3.2"], str(tmp_path / "model"), tie=False)
    (tmp_path / "model" / "chat_template.jinja").unlink()
    out = tmp_path / "out"
    train(model_dir, write_data(tmp_path), out, "--use_lora", "--lora_r", "2", "--merge_lora_on_save")
    saved = load_file(out / "merged" / "model.safetensors")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= saved.keys() and not any("token_adapter" in k for k in saved)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(out)))
    adapted = PeftModel.from_pretrained(base, out).eval()
    im_start, im_end = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = torch.tensor([[im_start, 9906, 11, im_end, 271]])
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)


def base_model_with_own_template(real_tokenizer_dirs, out_dir) -> str:
    """A Llama-3.2 *base* model: eos `<|end_of_text|>` (tokenizer, config, generation config) while its chat template
    ends assistant turns with `<|eot_id|>`, as meta-llama/Llama-3.2-1B ships (Qwen2.5 base: `<|endoftext|>` / `<|im_end|>`)."""
    import shutil

    source = out_dir + "_tokenizer"
    shutil.copytree(real_tokenizer_dirs["llama3.2"], source)
    config_path = f"{source}/tokenizer_config.json"
    config = json.load(open(config_path))
    config["eos_token"] = "<|end_of_text|>"
    json.dump(config, open(config_path, "w"))
    return tiny_model_for(source, out_dir, tie=False)


def test_template_end_of_turn_is_found_for_real_templates(real_tokenizer):
    from dftune.data.tokenizer import template_end_of_turn

    from helpers import TEMPLATES

    llama, qwen = real_tokenizer("llama3.2"), real_tokenizer("qwen2.5")
    assert llama.convert_ids_to_tokens(template_end_of_turn(llama, {})) == "<|eot_id|>"
    assert qwen.convert_ids_to_tokens(template_end_of_turn(qwen, {})) == "<|im_end|>"
    qwen.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    assert qwen.convert_ids_to_tokens(template_end_of_turn(qwen, {"enable_thinking": False})) == "<|im_end|>"
    qwen.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # writes no control token
    assert template_end_of_turn(qwen, {}) is None


@pytest.mark.integration
def test_saved_base_model_stops_at_its_templates_end_of_turn(tmp_path, real_tokenizer_dirs):
    """A base model whose eos is not the end-of-turn token its template writes: training supervises `<|eot_id|>`, so
    the saved generation_config must stop there too, or a user's model.generate runs past every answer (and
    eval_gen_finished, which stops at known end-of-turn tokens, said 1 while the saved model never stopped)."""
    model_dir = base_model_with_own_template(real_tokenizer_dirs, str(tmp_path / "model"))
    eot = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|eot_id|>")
    assert AutoModelForCausalLM.from_pretrained(model_dir).generation_config.eos_token_id == 128001
    out = tmp_path / "out"
    train(model_dir, write_data(tmp_path), out, "--max_steps", "1")
    saved = AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id
    assert saved == [128001, eot]
