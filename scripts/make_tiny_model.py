"""Builds the bundled tiny Qwen2 model and its ChatML tokenizer, offline and deterministically.

    python scripts/make_tiny_model.py OUT_DIR [--data_dir data/sample] [--pretrain_steps 300]

1. Trains a small byte-level BPE tokenizer on the sample corpus with exactly the normaliser and
   pre-tokeniser that transformers' `Qwen2Tokenizer` rebuilds on load, so ids are identical before
   and after `AutoTokenizer.from_pretrained` (a test checks it).
2. Builds a 2-layer Qwen2 causal LM (tied embeddings, like Qwen2.5-0.5B).
3. Briefly pre-trains it with plain cross-entropy on *every* token of the corpus. A random model gives
   p_t ~ 1/vocab, so DFT (whose gradient is weighted by p_t) would barely move it; after this warm-up
   p_t is no longer tiny and the DFT demo visibly lowers its loss and raises avg_p_correct.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os

import torch

from dftune.data.templates import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def read_corpus(data_dir: str) -> list[list[dict]]:
    conversations = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*.json*"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
        conversations += [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in records]
    if not conversations:
        raise SystemExit(f"error: no *.json/*.jsonl files in {data_dir}; run scripts/make_sample_data.py first")
    return conversations


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in state["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def pretrain(
    model, tokenizer, conversations, steps: int, seed: int, batch_size: int = 16, learning_rate: float = 3e-3,
    cosine_decay: bool = False,
) -> None:
    """Plain next-token cross-entropy on whole conversations (no masking): a warm start, not the product.
    (scripts/experiment_small.py pre-trains its base model with it too.)"""
    generator = torch.Generator().manual_seed(seed)
    rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    rows = [r["input_ids"] if isinstance(r, dict) else list(r) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    decay = (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))) if cosine_decay else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    model.train()
    for step in range(steps):
        picks = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        longest = max(len(rows[i]) for i in picks)
        input_ids = torch.full((batch_size, longest), tokenizer.pad_token_id)
        labels = torch.full((batch_size, longest), -100)
        for b, i in enumerate(picks):
            input_ids[b, : len(rows[i])] = torch.tensor(rows[i])
            labels[b, : len(rows[i])] = torch.tensor(rows[i])
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"  pretrain step {step:4d}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="Directory to write the model and tokenizer to.")
    parser.add_argument("--data_dir", default="data/sample", help="Corpus for the tokenizer and the warm-up.")
    parser.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size (special tokens included).")
    parser.add_argument("--pretrain_steps", type=int, default=120, help="Warm-up steps of plain CE; 0 keeps random weights.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for weights and warm-up batches.")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(args.seed)
    conversations = read_corpus(args.data_dir)
    texts = [m["content"] for c in conversations for m in c]
    tokenizer = build_tokenizer(texts, args.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if args.pretrain_steps > 0:
        print(f"warm-up pre-training the tiny model for {args.pretrain_steps} steps (plain CE, all tokens)")
        pretrain(model, tokenizer, conversations, args.pretrain_steps, args.seed)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved tiny qwen2 ({n_params / 1e3:.0f}K parameters, vocab {len(tokenizer)}) to {args.out_dir}")


if __name__ == "__main__":
    main()
