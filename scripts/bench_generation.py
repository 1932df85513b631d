"""Benchmark: generation evaluation throughput, batched (left-padded, KV cache) against one prompt at a time; prints JSON.

    python scripts/bench_generation.py                          # tiny model, 64 prompts, batch 1 and 16
    python scripts/bench_generation.py --model_name_or_path M --batch_sizes 1 8 32 --max_new_tokens 64

Runs the code training evaluates with (eval_generation.GenerationEvaluator, greedy) on the sample
generation questions, repeated to --num_prompts. Reports generated tokens (end-of-turn included) per
wall-clock second and per CPU-second of this process: on a machine shared with other jobs the second
is what the code achieves with its cores to itself. The outputs of every batch size are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from dftune.eval.generation import GenerationEvalArguments, GenerationEvaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, "assets", "tiny-qwen2"))
    parser.add_argument("--prompts", default=os.path.join(ROOT, "data", "sample_eval", "questions.jsonl"))
    parser.add_argument("--num_prompts", type=int, default=64, help="Prompts scored (the file repeated).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).eval()
    with open(args.prompts, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines[i % len(lines)] for i in range(args.num_prompts))
        results, outputs = [], {}
        for batch_size in args.batch_sizes:
            gen_args = GenerationEvalArguments(
                eval_generation_files=[path], eval_generation_batch_size=batch_size, eval_generation_max_new_tokens=args.max_new_tokens
            )
            evaluator = GenerationEvaluator(gen_args, tokenizer)
            evaluator.prompts, evaluator.prompt_ids = evaluator.prompts[:2], evaluator.prompt_ids[:2]  # warm-up
            evaluator.generate(model)
            evaluator = GenerationEvaluator(gen_args, tokenizer)
            wall, cpu = time.perf_counter(), time.process_time()
            records = evaluator.generate(model)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            tokens = sum(r["tokens"] for r in records)
            outputs[batch_size] = [r["output"] for r in sorted(records, key=lambda r: r["index"])]
            results.append({
                "batch_size": batch_size, "prompts": len(records), "generated_tokens": tokens,
                "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1), "tokens_per_cpu_s": round(tokens / cpu, 1),
            })
    first = outputs[args.batch_sizes[0]]
    result = {
        "model": args.model_name_or_path, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
        "device": "cpu", "torch": torch.__version__, "runs": results,
        "same_outputs_for_every_batch_size": all(o == first for o in outputs.values()),
        "speedup_largest_batch_vs_first": round(results[-1]["tokens_per_cpu_s"] / results[0]["tokens_per_cpu_s"], 2),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
