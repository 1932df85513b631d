"""Benchmark: tokenise synthetic multi-turn conversations with 1 and 2 workers; prints JSON.

    python scripts/bench_data.py                      # 20,000 conversations of ~500 tokens, tiny tokenizer
    python scripts/bench_data.py --num_conversations 2000 --workers 1 --profile
    python scripts/bench_data.py --tokenizer DIR --data_files ../shared/real/data/llamafactory   # real records, repeated

Measures the tokenising stage of the pipeline (`datasets.map` of `ConversationTokenizer`, the code
`build_datasets` runs) and the whole `build_datasets` (read JSONL, normalise, tokenise, save) with the
cache off. Tokenizers' own thread pool is turned off so that one worker uses one core. Besides wall-clock
conversations/s it reports conversations per CPU-second (this process plus its map workers), which is
what one worker achieves with a core to itself, even on a machine shared with other jobs.
--profile adds where one worker's time goes (template rendering, span finding, tokenizer, labels).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from types import SimpleNamespace

from dftune.data.build import build_datasets
from dftune.data.encoding import ConversationTokenizer
from dftune.data.files import iter_records, resolve_data_files
from dftune.data.formats import normalize_record
from dftune.data.templates import ensure_chat_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the model learns to answer questions about data training loss tokens gradient batch step rate weight "
    "layer attention head vector matrix value python code file line error result example because when "
    "which there their would could should about after before during between under again further"
).split()
CHINESE = ["模型", "训练", "数据", "问题", "回答", "因为", "所以", "我们", "可以", "这个"]


def synthetic_conversation(rng: random.Random, turns: int = 3) -> dict:
    """System prompt + `turns` user/assistant exchanges, about 500 tiny-tokenizer tokens in all."""

    def sentence(words: int) -> str:
        picked = [rng.choice(CHINESE) if rng.random() < 0.1 else rng.choice(WORDS) for _ in range(words)]
        return " ".join(picked).capitalize() + rng.choice([".", "?", "!", ".\n\n"])

    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng.randint(5, 12))})
        messages.append({"role": "assistant", "content": " ".join(sentence(rng.randint(6, 12)) for _ in range(rng.randint(2, 3)))})
    return {"messages": messages}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the datasets.map workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_map(rows: list[dict], tokenizer, workers: int, max_length: int) -> dict:
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    encoder = ConversationTokenizer(tokenizer, max_length)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    tokenised = dataset.map(encoder.to_arrow, batched=True, batch_size=500, num_proc=workers if workers > 1 else None,
                            remove_columns=["messages"], new_fingerprint=f"bench-{workers}-{time.time()}")
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    lengths = tokenised["length"]
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "conversations_per_s": round(len(rows) / seconds, 1),
        "conversations_per_s_per_worker": round(len(rows) / seconds / workers, 1),
        "cpu_seconds": round(cpu, 2),
        "conversations_per_cpu_s": round(len(rows) / cpu, 1),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "tokens_per_s": round(sum(lengths) / seconds),
    }


def bench_build(path: str, tokenizer, workers: int, max_length: int, count: int) -> dict:
    data_args = SimpleNamespace(data_files=[path], eval_data_files=None, max_length=max_length, preprocessing_num_workers=workers,
                                validation_split_percentage=0, strict_data=False, data_cache_dir="none")
    started, cpu_started = time.perf_counter(), cpu_seconds()
    build_datasets(data_args, tokenizer, None)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return {"workers": workers, "seconds": round(seconds, 2), "conversations_per_s": round(count / seconds, 1),
            "cpu_seconds": round(cpu, 2), "conversations_per_cpu_s": round(count / cpu, 1)}


def profile(rows: list[dict], tokenizer, max_length: int) -> dict:
    """Seconds per 1,000 conversations in each step of one worker's loop."""
    encoder = ConversationTokenizer(tokenizer, max_length)
    messages = [row["messages"] for row in rows]
    tools = [row.get("tools") for row in rows]
    timings = {}
    started = time.perf_counter()
    prepared = [encoder._prepare(m, t) for m, t in zip(messages, tools)]
    texts = [encoder.render(rendered, tools=tool_list) for rendered, tool_list, _, _ in prepared]
    timings["render"] = time.perf_counter() - started
    started = time.perf_counter()
    spans = [encoder.supervised_char_spans(m, t)[1] for m, t in zip(messages, tools)]
    timings["render_and_find_spans"] = time.perf_counter() - started
    started = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    timings["tokenizer"] = time.perf_counter() - started
    started = time.perf_counter()
    for encoding, text_spans in zip(encodings, spans):
        encoder._row(encoding.ids, [encoder._token_range(encoding, start, end) for start, end in text_spans])
    timings["labels_and_truncation"] = time.perf_counter() - started
    return {step: round(seconds / len(rows) * 1000, 3) for step, seconds in timings.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "assets", "tiny-qwen2"), help="Tokenizer directory.")
    parser.add_argument("--num_conversations", type=int, default=20000, help="Conversations to tokenise.")
    parser.add_argument("--data_files", nargs="+", default=None,
                        help="Real data (files, directories): its usable records, repeated to --num_conversations, instead of synthetic ones.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="preprocessing_num_workers values to time.")
    parser.add_argument("--max_length", type=int, default=4096, help="Truncation length (large: nothing truncated).")
    parser.add_argument("--skip_build", action="store_true", help="Time only the tokenising map, not build_datasets.")
    parser.add_argument("--profile", action="store_true", help="Also time each step of one worker on 2,000 conversations.")
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core

    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer

    disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ensure_chat_template(tokenizer)
    rng = random.Random(0)
    if args.data_files:
        records = [record for path in resolve_data_files(args.data_files)[0] for _, record, error in iter_records(path)
                   if error is None and normalize_record(record)[0] is not None]
        records = [records[i % len(records)] for i in range(args.num_conversations)]
        rows = [normalize_record(record)[0] for record in records]
    else:
        records = rows = [synthetic_conversation(rng) for _ in range(args.num_conversations)]
    result = {"tokenizer": args.tokenizer, "fast_tokenizer": bool(tokenizer.is_fast), "conversations": len(rows),
              "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()[0], "tokenise_map": [], "build_datasets": []}
    for workers in args.workers:
        result["tokenise_map"].append(bench_map(rows, tokenizer, workers, args.max_length))
    if not args.skip_build:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "bench.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            for workers in args.workers:
                result["build_datasets"].append(bench_build(path, tokenizer, workers, args.max_length, len(rows)))
    if args.profile:
        result["profile_ms_per_conversation"] = profile(rows[:2000], tokenizer, args.max_length)
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
