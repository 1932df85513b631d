"""End-to-end training throughput of DFTTrainer on random-init models of real shapes (JSON out).

    # realistic lengths (long-tailed, median ~600, tail to max_length): batch 1 vs padded vs packed
    python scripts/bench_train.py --model tiny --mode realistic --max_length 2048 --steps 4 --warmup 1  # CPU
    python scripts/bench_train.py --model qwen2.5-1.5b --mode realistic --max_length 8192 \
        --gradient_checkpointing --configs batch1 padded packed packed_flex                   # GPU
    # fixed 8K rows, batch 1, beside TRL's SFTTrainer(loss_type="dft") with and without Liger (issue 6)
    python scripts/bench_train.py --model qwen2.5-1.5b --mode fixed --max_length 8192 --gradient_checkpointing --compare_trl
    # the loss family side by side (each loss type x each loss impl; the anchor's reference model included)
    python scripts/bench_train.py --model tiny-32k --mode fixed --max_length 1024 --steps 4 --warmup 1 \
        --loss_types dft asft eaft --loss_impls full chunked                                    # CPU

Random tokens, no downloads, one optimizer step per batch (no accumulation). Each configuration
runs in its own process so that peak memory is its own; the parent prints one JSON object per line
("RESULT {...}"), then a table, and writes them all to --output_json.

Reported per configuration:
  real_tokens_per_s  tokens of conversations (never padding) processed per second after warm-up;
  padding_fraction   padded tokens / tokens fed to the model;
  peak_gib           torch.cuda.max_memory_allocated on GPU, peak RSS of the process on CPU;
  mfu                model FLOPs / (time x peak FLOPs): 6 x body parameters per real token, 6 x LM head
                     per supervised token, 6 x layers x hidden x n^2 per conversation of n tokens
                     (causal attention, forward + backward); recomputation from checkpointing not
                     counted. Peak FLOPs: --peak_tflops, else known GPUs' dense bf16 figure; none on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-32k": dict(vocab_size=32000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
REALISTIC_CONFIGS = ["batch1", "padded", "padded_grouped", "packed", "packed_flex"]
FIXED_CONFIGS = ["dft", "trl_dft", "trl_dft_liger"]
# Dense bf16 peak of known cards, FLOP/s.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES), help="Model shape (random init).")
    parser.add_argument("--mode", default="realistic", choices=["realistic", "fixed"],
                        help="realistic: long-tailed conversation lengths; fixed: every row max_length tokens, all supervised.")
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"Subset to run. realistic: {REALISTIC_CONFIGS} (default all but packed_flex on CPU); fixed: {FIXED_CONFIGS}.")
    parser.add_argument("--compare_trl", action="store_true", help="fixed mode: add trl_dft and trl_dft_liger (needs trl).")
    parser.add_argument("--max_length", type=int, default=4096, help="Row length (tokens) for packing and the length cap.")
    parser.add_argument("--median_length", type=int, default=600, help="Median conversation length (log-normal).")
    parser.add_argument("--sigma", type=float, default=1.0, help="Log-normal sigma of the conversation lengths.")
    parser.add_argument("--min_length", type=int, default=32, help="Shortest conversation.")
    parser.add_argument("--prompt_fraction", type=float, default=0.3, help="Leading share of a conversation left unsupervised.")
    parser.add_argument("--conversations", type=int, default=4000, help="Conversations generated (realistic mode).")
    parser.add_argument("--padded_batch_size", type=int, default=8, help="Conversations per batch for padded configs.")
    parser.add_argument("--steps", type=int, default=20, help="Timed optimizer steps.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed optimizer steps before them.")
    parser.add_argument("--attn", default="sdpa", help="Attention implementation (packed_flex uses flex_attention).")
    parser.add_argument("--loss_impl", default="auto", choices=["auto", "full", "chunked"], help="DFT loss implementation.")
    parser.add_argument("--loss_impls", nargs="+", default=None, choices=["auto", "full", "chunked"],
                        help="Run every configuration with each of these loss implementations (overrides --loss_impl).")
    parser.add_argument("--loss_type", default="dft", choices=["dft", "sft", "asft", "eaft"], help="--loss_type of DFTTrainer.")
    parser.add_argument("--loss_types", nargs="+", default=None, choices=["dft", "sft", "asft", "eaft"],
                        help="Run every configuration with each of these loss types (overrides --loss_type).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    parser.add_argument("--no_bf16", action="store_true", help="fp32 on GPU too (bf16 is the GPU default; CPU is fp32).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Peak FLOP/s of the device in TFLOP/s, for MFU.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of lengths, tokens and model init.")
    parser.add_argument("--output_json", default=None, help="Write the results here (default: $OUT/bench_train.json if $OUT is set).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    return parser.parse_args(argv)


# ---- data -----------------------------------------------------------------------------------------
def conversation_lengths(args) -> list[int]:
    """Log-normal lengths (median --median_length), clipped to [--min_length, --max_length]."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    normal = torch.randn(args.conversations, generator=generator, dtype=torch.float64)
    lengths = (math.log(args.median_length) + args.sigma * normal).exp().round().long()
    return lengths.clamp(args.min_length, args.max_length).tolist()


def realistic_dataset(args, vocab_size: int):
    """Random-token conversations; the first --prompt_fraction of each is unsupervised."""
    import torch
    from datasets import Dataset

    from dftune.loss.core import IGNORE_INDEX

    generator = torch.Generator().manual_seed(args.seed + 1)
    rows = {"input_ids": [], "labels": [], "length": []}
    for length in conversation_lengths(args):
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        prompt = max(1, int(length * args.prompt_fraction))
        rows["input_ids"].append(ids)
        rows["labels"].append([IGNORE_INDEX] * prompt + ids[prompt:])
        rows["length"].append(length)
    return Dataset.from_dict(rows)


def fixed_dataset(args, vocab_size: int, rows: int):
    """Rows of --max_length random tokens, every one supervised but the first (our label contract)."""
    import torch
    from datasets import Dataset

    from dftune.loss.core import IGNORE_INDEX

    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, vocab_size, (rows, args.max_length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": [[IGNORE_INDEX] + row[1:] for row in ids],
                              "length": [args.max_length] * rows})


class CountingCollator:
    """Wraps a collator and records, per batch, real tokens, fed tokens, supervised tokens and sum(n^2)."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int, int, int]] = []

    def __call__(self, features):
        batch = self.collator(features)
        real = sum(len(f["input_ids"]) for f in features)
        squares = sum(n * n for f in features for n in (f.get("sequence_lengths") or [len(f["input_ids"])]))
        supervised = int((batch["labels"][..., 1:] != -100).sum())
        self.batches.append((real, batch["input_ids"].numel(), supervised, squares))
        return batch


# ---- one configuration (child process) ------------------------------------------------------------
def build_model(args, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cuda = torch.cuda.is_available()
    config = Qwen2Config(max_position_embeddings=max(args.max_length, 32768), **SHAPES[args.model])
    dtype = torch.bfloat16 if cuda and not args.no_bf16 else torch.float32
    torch.manual_seed(args.seed)
    with torch.device("cuda" if cuda else "cpu"):  # initialising on the GPU is much faster
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model.config.use_cache = False
    return model


def model_flops(model, real_tokens: int, supervised_tokens: int, sum_squares: int) -> float:
    """Training FLOPs (forward + backward) for the given work; see the module docstring."""
    config = model.config
    body = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)
    head = config.vocab_size * config.hidden_size
    attention_width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 6.0 * body * real_tokens + 6.0 * head * supervised_tokens + 6.0 * config.num_hidden_layers * attention_width * sum_squares


def peak_flops(args) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def run_one(args, config_name: str) -> dict:
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    bf16 = cuda and not args.no_bf16
    attn = "flex_attention" if config_name == "packed_flex" else args.attn
    model = build_model(args, attn)
    steps = args.warmup + args.steps

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, trainer_args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    output_dir = tempfile.mkdtemp(prefix=f"bench_train_{config_name}_")
    common = dict(output_dir=output_dir, max_steps=steps, learning_rate=1e-5, logging_steps=10**6, save_strategy="no",
                  report_to="none", bf16=bf16, use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True,
                  optim="adamw_torch_fused" if cuda else "adamw_torch", seed=args.seed, gradient_accumulation_steps=1)
    if config_name.startswith("trl"):
        trainer, counter = build_trl_trainer(args, config_name, model, common, steps, Clock())
    else:
        trainer, counter = build_dft_trainer(args, config_name, model, common, steps, Clock(), attn)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    timed = len(stamps) - args.warmup
    seconds = stamps[-1] - stamps[args.warmup - 1] if args.warmup else stamps[-1] - started
    window = counter.batches[args.warmup : len(stamps)] if counter else []
    real, fed, supervised, squares = (sum(column) for column in zip(*window)) if window else (0, 0, 0, 0)
    flops = model_flops(model, real, supervised, squares)
    device_peak = peak_flops(args)
    return {
        "config": config_name, "mode": args.mode, "model": args.model, "max_length": args.max_length,
        "attn": attn, "loss_impl": getattr(trainer, "loss_impl", "trl"), "bf16": bf16,
        "loss_type": "trl_dft" if config_name.startswith("trl") else args.loss_type,
        "gradient_checkpointing": args.gradient_checkpointing, "timed_steps": timed,
        "step_s": round(seconds / timed, 4), "real_tokens_per_s": round(real / seconds, 1),
        "padding_fraction": round(1 - real / fed, 4) if fed else None,
        "real_tokens_per_step": round(real / timed, 1), "supervised_tokens_per_step": round(supervised / timed, 1),
        "peak_gib": round((torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) / 2**30, 3),
        "peak_memory": "cuda_max_allocated" if cuda else "process_peak_rss",
        "tflops_per_s": round(flops / seconds / 1e12, 4),
        "mfu": round(flops / seconds / device_peak, 4) if device_peak else None,
        "total_s": round(time.perf_counter() - started, 1),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_dft_trainer(args, config_name, model, common, steps, clock, attn):
    from dftune.arguments import DFTTrainingArguments
    from dftune.data.collators import DataCollatorForDFT
    from dftune.data.packing import FLATTEN_ATTENTION, DataCollatorForPacking, pack_dataset
    from dftune.trainer import DFTTrainer

    vocab_size = model.config.vocab_size
    batch_size = 1
    if args.mode == "fixed":
        dataset = fixed_dataset(args, vocab_size, steps + 2)
        collator = DataCollatorForDFT(pad_token_id=0)
    else:
        dataset = realistic_dataset(args, vocab_size)
        if config_name.startswith("packed"):
            dataset = pack_dataset(dataset, args.max_length)
            collator = DataCollatorForPacking(pad_token_id=0, flatten=attn in FLATTEN_ATTENTION)
        else:
            collator = DataCollatorForDFT(pad_token_id=0)
            batch_size = args.padded_batch_size if config_name.startswith("padded") else 1
    counter = CountingCollator(collator)
    training_args = DFTTrainingArguments(
        **common, per_device_train_batch_size=batch_size, loss_impl=args.loss_impl, loss_type=args.loss_type,
        enable_gradient_checkpointing=args.gradient_checkpointing, group_by_length=config_name == "padded_grouped",
    )
    trainer = DFTTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=counter, callbacks=[clock])
    return trainer, counter


def build_trl_trainer(args, config_name, model, common, steps, clock):
    """TRL's SFTTrainer(loss_type="dft") as in ../shared/device/trl_baseline.py: input_ids only, its collator."""
    import importlib.util

    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    liger = config_name.endswith("liger")
    if liger and importlib.util.find_spec("liger_kernel") is None:
        raise RuntimeError("liger_kernel is not installed")
    vocab_size = model.config.vocab_size
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")),
        pad_token="t1", eos_token="t2",
    )
    dataset = Dataset.from_dict({"input_ids": fixed_dataset(args, vocab_size, steps + 2)["input_ids"]})
    trl_args = SFTConfig(**common, per_device_train_batch_size=1, loss_type="dft", max_length=args.max_length,
                         dataset_kwargs={"skip_prepare_dataset": True}, packing=False, use_liger_kernel=liger,
                         gradient_checkpointing=args.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    return trainer, counter


# ---- parent: one process per configuration --------------------------------------------------------
def default_configs(args) -> list[str]:
    import torch

    if args.configs:
        return args.configs
    if args.mode == "fixed":
        return FIXED_CONFIGS if args.compare_trl else FIXED_CONFIGS[:1]
    # flex_attention compiles for minutes on CPU; ask for it with --configs there.
    return REALISTIC_CONFIGS if torch.cuda.is_available() else REALISTIC_CONFIGS[:-1]


def data_summary(args) -> dict:
    """Length distribution and the packing efficiency of the realistic data, computed without a model."""
    from dftune.data.packing import best_fit_decreasing

    lengths = sorted(conversation_lengths(args))
    rows = best_fit_decreasing(lengths, args.max_length)
    quantile = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {"conversations": len(lengths), "median": quantile(0.5), "mean": round(sum(lengths) / len(lengths), 1),
            "p90": quantile(0.9), "p99": quantile(0.99), "max": lengths[-1],
            "packed_rows": len(rows), "packing_efficiency": round(sum(lengths) / (len(rows) * args.max_length), 4)}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(args, args.child)), flush=True)
        return []
    argv = sys.argv[1:] if argv is None else argv
    results = []
    if args.mode == "realistic":
        summary = {"data": data_summary(args)}
        print("RESULT " + json.dumps(summary), flush=True)
        results.append(summary)
    loss_types = args.loss_types or [args.loss_type]
    loss_impls = args.loss_impls or [args.loss_impl]
    for config_name in default_configs(args):
        variants = [(t, i) for t in loss_types for i in loss_impls] if not config_name.startswith("trl") else [(None, None)]
        for loss_type, loss_impl in variants:
            extra = ["--loss_type", loss_type, "--loss_impl", loss_impl] if loss_type else []
            process = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, *extra, "--child", config_name],
                                     capture_output=True, text=True)
            lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
            if process.returncode == 0 and lines:
                result = json.loads(lines[-1][len("RESULT "):])
            else:
                error = (process.stderr.strip().splitlines() or ["no output"])[-1]
                result = {"config": config_name, "error": error, "returncode": process.returncode}
            if len(variants) > 1:  # "asft:chunked", or "packed:asft:chunked" for a realistic-mode configuration
                result["config"] = ":".join(([] if config_name == "dft" else [config_name]) + [loss_type, loss_impl])
            print("RESULT " + json.dumps(result), flush=True)
            results.append(result)
    print_table(results)
    output = args.output_json or (os.path.join(os.environ["OUT"], "bench_train.json") if os.environ.get("OUT") else None)
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
    return results


def print_table(results: list[dict]) -> None:
    rows = [r for r in results if "config" in r]
    base = next((r["real_tokens_per_s"] for r in rows if r["config"].split(":")[0] in ("batch1", "dft") and "real_tokens_per_s" in r), None)
    print(f"{'config':24} {'tokens/s':>12} {'vs first':>9} {'padding':>8} {'peak GiB':>9} {'MFU':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:24} error: {r['error']}")
            continue
        speedup = f"{r['real_tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        padding = f"{100 * r['padding_fraction']:.1f}%" if r.get("padding_fraction") is not None else "-"
        print(f"{r['config']:24} {r['real_tokens_per_s']:>12,.0f} {speedup:>9} {padding:>8} {r['peak_gib']:>9.2f} {mfu:>7}")


if __name__ == "__main__":
    main()
