"""The small experiment: SFT, DFT and its variants x 3 seeds on a checkable task, on a 2-core CPU.

    python scripts/experiment_small.py [--output_dir outputs/experiment_small] [--variants sft dft asft] [--seeds 3]
    python scripts/experiment_small.py --smoke        # the pipeline in well under a minute (tests run it)
    bash scripts/experiment_small.sh                  # the same; also `dft-compare --preset small`

1. Task data (deterministic, `--data_seed`): word problems about people and things, solved as worked
   equations ("7 + 5 = 12. 12 - 3 = 9. The answer is 9."), every number in 0..20.
   - pre-training corpus: single-operation facts ("What is 6 + 4?"), one-step word problems and a few
     (10%) two-step ones: it teaches the format, the arithmetic and the words for + and -;
   - fine-tuning set: two-step problems, start 1-10, each move 1-6 things;
   - evaluation by generation (`--eval_answer_match math`, the final number):
     `id` two-step problems whose numbers (start, moves) are held out of fine-tuning and pre-training,
     `bignum` two-step problems moving 7-10 things (sums the base knows, moves fine-tuning never made),
     `3step` three-step problems (a longer chain than fine-tuning), and
     `retention` single-operation questions and one-step problems, what the base could do before
     fine-tuning (the drift that ASFT is meant to prevent); eval_ce_loss / eval_avg_p_correct on the
     `id` problems as conversations with their worked answers.
2. A base model, pre-trained once from scratch (a small Qwen2 config with a BPE tokenizer trained on the
   corpus, scripts/make_tiny_model.py's code) with plain cross-entropy on every token; kept in
   OUTPUT_DIR/base_model and reused by later invocations.
3. The sweep (eval_compare.run_sweep): every variant x seed fine-tuned with train_dft.py on the same data,
   budget and evaluation; compare.json, compare.png and the table in OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass, replace

from dftune.sweep.compare import SweepConfig, SweepError, parse_variants, run_sweep
from dftune.sweep.results import format_table

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kim", "Leo"]
ITEMS = ["apples", "books", "coins", "shells", "stamps", "marbles", "pens", "cards", "eggs", "stones"]
ADD_PHRASES = ["buys {n} more", "finds {n} more", "gets {n} more"]
SUB_PHRASES = ["gives {n} away", "loses {n}", "sells {n}"]
FACT_LIMIT = 20  # every number the base sees is in 0..20: sums of two numbers up to 10, differences
TRAIN_AMOUNT = 6  # fine-tuning moves 1..6 things at a time; the `bignum` split moves 7..10
EVAL_SPLITS = ("id", "bignum", "3step", "retention")


@dataclass(frozen=True)
class Preset:
    """Sizes of one experiment (FULL: the committed result; SMOKE: the test suite's pipeline check)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    pretrain_examples: int
    pretrain_steps: int
    pretrain_batch: int
    train_examples: int
    eval_examples: int
    max_steps: int
    eval_steps: int
    batch_size: int
    learning_rate: float
    max_new_tokens: int
    variants: tuple[str, ...]
    seeds: int


FULL = Preset(
    hidden_size=96, num_layers=3, intermediate_size=256, vocab_size=400, pretrain_examples=6000, pretrain_steps=1200,
    pretrain_batch=32, train_examples=2000, eval_examples=48, max_steps=150, eval_steps=50, batch_size=16,
    learning_rate=5e-4, max_new_tokens=48, seeds=3,
    # DFT with a weight floor (the authors' suggestion when gradients vanish) and SFT-then-DFT (alpha warm-up).
    variants=("sft", "dft", "asft", "dft+dft_min_weight=0.1", "dft+dft_alpha_warmup_ratio=0.5"),
)
SMOKE = Preset(
    hidden_size=32, num_layers=1, intermediate_size=64, vocab_size=300, pretrain_examples=200, pretrain_steps=10,
    pretrain_batch=8, train_examples=32, eval_examples=4, max_steps=3, eval_steps=3, batch_size=8,
    learning_rate=1e-3, max_new_tokens=8, variants=("sft", "dft"), seeds=1,
)


# ---- the task -----------------------------------------------------------------------------------------
def word_problem(rng: random.Random, start: int, moves: list[int]) -> tuple[str, str, int]:
    """(question, worked answer, final number) for a start amount and signed moves (+n buys, -n gives)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    sentences = [f"{name} has {start} {item}."]
    equations, total = [], start
    for index, move in enumerate(moves):
        phrase = rng.choice(ADD_PHRASES if move > 0 else SUB_PHRASES).format(n=abs(move))
        sentences.append(f"{'Then ' if index else ''}{name} {phrase}.")
        new_total = total + move
        equations.append(f"{total} {'+' if move > 0 else '-'} {abs(move)} = {new_total}.")
        total = new_total
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), " ".join(equations) + f" The answer is {total}.", total


def random_moves(rng: random.Random, start: int, steps: int, low: int, high: int) -> list[int]:
    """Signed moves whose running total stays in 0..FACT_LIMIT, at least one + and one - when steps > 1."""
    while True:
        moves, total = [], start
        for _ in range(steps):
            amount = rng.randint(low, high)
            sign = rng.choice((1, -1))
            if not 0 <= total + sign * amount <= FACT_LIMIT:
                sign = -sign
            if not 0 <= total + sign * amount <= FACT_LIMIT:
                break
            moves.append(sign * amount)
            total += sign * amount
        if len(moves) == steps and (steps == 1 or {m > 0 for m in moves} == {True, False}):
            return moves


def fact_question(rng: random.Random) -> tuple[str, str, int]:
    """A bare single-operation question with its worked answer."""
    if rng.random() < 0.5:
        a, b = rng.randint(0, FACT_LIMIT // 2), rng.randint(0, FACT_LIMIT // 2)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b
    a = rng.randint(0, FACT_LIMIT)
    b = rng.randint(0, min(a, FACT_LIMIT // 2))
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}. The answer is {a - b}.", a - b


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def generation_record(question: str, final: int) -> dict:
    """An --eval_generation_files record: the prompt as messages and the reference answer."""
    return {"messages": [{"role": "user", "content": question}], "answer": str(final)}


def held_out(numbers: tuple[int, ...]) -> bool:
    """A fixed fifth of the two-step number combinations is kept for the `id` evaluation: never trained on."""
    return zlib.crc32(repr(numbers).encode()) % 5 == 0


def build_task(preset: Preset, data_seed: int) -> dict[str, list[dict]]:
    """Every split of the task as records (pure, deterministic for a data_seed).

    Two-step problems are split by their numbers (`held_out`): the `id` evaluation uses (start, moves)
    combinations that occur neither in fine-tuning nor in pre-training, so a right answer is not a
    memorised one.
    """
    rng = random.Random(data_seed)

    def two_step(low: int, high: int, keep_held_out: bool) -> tuple[str, str, int]:
        while True:
            start = rng.randint(1, 10)
            moves = random_moves(rng, start, 2, low, high)
            if held_out((start, *moves)) == keep_held_out:
                return word_problem(rng, start, moves)

    pretrain = []
    for _ in range(preset.pretrain_examples):
        draw = rng.random()
        if draw < 0.45:
            question, answer, _ = fact_question(rng)
        elif draw < 0.9:
            start = rng.randint(1, 15)
            question, answer, _ = word_problem(rng, start, random_moves(rng, start, 1, 1, 5))
        else:  # a few two-step problems: the base has seen the format, fine-tuning teaches the skill
            question, answer, _ = two_step(1, TRAIN_AMOUNT, keep_held_out=False)
        pretrain.append(chat(question, answer))
    train = [chat(*two_step(1, TRAIN_AMOUNT, keep_held_out=False)[:2]) for _ in range(preset.train_examples)]
    splits: dict[str, list[dict]] = {"pretrain": pretrain, "train": train, "eval_conversations": []}
    splits.update({name: [] for name in EVAL_SPLITS})
    for _ in range(preset.eval_examples):
        question, answer, final = two_step(1, TRAIN_AMOUNT, keep_held_out=True)
        splits["id"].append(generation_record(question, final))
        splits["eval_conversations"].append(chat(question, answer))
        question, _, final = two_step(TRAIN_AMOUNT + 1, 10, keep_held_out=False)
        splits["bignum"].append(generation_record(question, final))
        start = rng.randint(1, 10)
        question, _, final = word_problem(rng, start, random_moves(rng, start, 3, 1, TRAIN_AMOUNT))
        splits["3step"].append(generation_record(question, final))
        if rng.random() < 0.5:
            question, _, final = fact_question(rng)
        else:
            start = rng.randint(1, 15)
            question, _, final = word_problem(rng, start, random_moves(rng, start, 1, 1, 5))
        splits["retention"].append(generation_record(question, final))
    return splits


def write_task(splits: dict[str, list[dict]], data_dir: str) -> dict[str, str]:
    os.makedirs(data_dir, exist_ok=True)
    paths = {}
    for name, records in splits.items():
        paths[name] = os.path.join(data_dir, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
    return paths


# ---- the base model ---------------------------------------------------------------------------------------
def build_base_model(preset: Preset, corpus: list[dict], out_dir: str, seed: int = 0) -> float:
    """Tokenizer + small Qwen2 pre-trained from scratch on the corpus (every token, plain CE). Returns seconds."""
    import torch
    from make_tiny_model import build_tokenizer, pretrain
    from transformers import AutoModelForCausalLM, Qwen2Config

    started = time.time()
    torch.manual_seed(seed)
    conversations = [record["messages"] for record in corpus]
    tokenizer = build_tokenizer([m["content"] for c in conversations for m in c], preset.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    print(f"pre-training the base model ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}K parameters) "
          f"for {preset.pretrain_steps} steps on {len(corpus)} conversations", flush=True)
    pretrain(model, tokenizer, conversations, preset.pretrain_steps, seed, batch_size=preset.pretrain_batch, cosine_decay=True)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return time.time() - started


# ---- the sweep ------------------------------------------------------------------------------------------------
def train_flags(preset: Preset, paths: dict[str, str]) -> list[str]:
    """The same data, budget and evaluation for every run."""
    return [
        "--data_files", paths["train"],
        "--eval_data_files", paths["eval_conversations"],
        "--eval_generation_files", *[paths[name] for name in EVAL_SPLITS],
        "--eval_answer_match", "math",
        "--eval_generation_max_new_tokens", str(preset.max_new_tokens),
        "--max_steps", str(preset.max_steps), "--per_device_train_batch_size", str(preset.batch_size),
        "--per_device_eval_batch_size", "64", "--eval_generation_batch_size", "64", "--learning_rate", str(preset.learning_rate),
        "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1", "--max_length", "256",
        "--logging_steps", str(max(1, preset.eval_steps // 5)), "--eval_strategy", "steps",
        "--eval_steps", str(preset.eval_steps), "--eval_on_start", "True",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--data_cache_dir", "none",
    ]


def base_eval_flags(preset: Preset, paths: dict[str, str]) -> list[str]:
    return [
        "--eval_generation_files", *[paths[name] for name in EVAL_SPLITS], "--eval_answer_match", "math",
        "--eval_generation_max_new_tokens", str(preset.max_new_tokens), "--eval_data_files", paths["eval_conversations"],
        "--max_length", "256", "--per_device_eval_batch_size", "64", "--eval_generation_batch_size", "64",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="default outputs/experiment_small (outputs/experiment_small_smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline, not the result")
    parser.add_argument(
        "--variants", nargs="+", default=None,
        help="default: sft dft asft dft+dft_min_weight=0.1 dft+dft_alpha_warmup_ratio=0.5 (smoke: sft dft)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument("--max_steps", type=int, default=None, help="fine-tuning steps per run (default 150)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the generated task data")
    parser.add_argument("--launcher", default="python", help="as in dft-compare")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2: one per core of a 2-core CPU)")
    parser.add_argument("--overwrite", action="store_true", help="as in dft-compare: redo the runs an earlier invocation made differently")
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    if args.max_steps:
        preset = replace(preset, max_steps=args.max_steps)
    output_dir = args.output_dir or ("outputs/experiment_small_smoke" if args.smoke else "outputs/experiment_small")
    variants = parse_variants(args.variants or list(preset.variants))
    seeds = list(range(args.seeds if args.seeds is not None else preset.seeds))

    started = time.time()
    splits = build_task(preset, args.data_seed)
    paths = write_task(splits, os.path.join(output_dir, "data"))
    print(", ".join(f"{name}: {len(records)}" for name, records in splits.items()) + f" records in {os.path.join(output_dir, 'data')}")
    base_model = os.path.join(output_dir, "base_model")
    timing_path = os.path.join(output_dir, "experiment_timing.json")
    timing = json.load(open(timing_path, encoding="utf-8")) if os.path.isfile(timing_path) else {}
    if not os.path.isfile(os.path.join(base_model, "model.safetensors")):
        timing["base_pretrain_seconds"] = round(build_base_model(preset, splits["pretrain"], base_model), 1)
    else:
        print(f"base model already in {base_model}, reused")
    config = SweepConfig(
        model_name_or_path=base_model,
        output_dir=output_dir,
        variants=variants,
        seeds=seeds,
        train_flags=train_flags(preset, paths),
        launcher=args.launcher,
        parallel=args.parallel,
        base_eval_flags=base_eval_flags(preset, paths),
        command_line=" ".join(["python", "scripts/experiment_small.py", *(argv if argv is not None else sys.argv[1:])]),
        overwrite=args.overwrite,
    )
    try:
        compare = run_sweep(config)
    except SweepError as err:  # e.g. --max_steps other than the runs already in OUTPUT_DIR
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    timing["last_invocation_seconds"] = round(time.time() - started, 1)
    with open(timing_path, "w", encoding="utf-8") as f:
        json.dump(timing, f, indent=2)
    print(format_table(compare))
    print(f"wrote {os.path.join(output_dir, 'compare.json')}, {compare.get('figure')}; this invocation took {timing['last_invocation_seconds']:.0f} s")
    return compare


if __name__ == "__main__":
    main()
