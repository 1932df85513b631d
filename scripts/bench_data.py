"""Benchmark: tokenise synthetic multi-turn conversations with 1 and 2 workers; prints JSON.

    python scripts/bench_data.py                      # 20,000 conversations of ~500 tokens, tiny tokenizer
    python scripts/bench_data.py --num_conversations 2000 --workers 1 --profile
    python scripts/bench_data.py --tokenizer DIR --data_files ../shared/real/data/llamafactory   # real records, repeated
    python scripts/bench_data.py --compare_tree /tmp/old   # the same map timed with another checkout's dftune, in turns
    python scripts/bench_data.py --sizes 10000 50000 200000 1000000   # time and peak RSS per N (~330-token conversations)

Measures the tokenising stage of the pipeline (`datasets.map` of `ConversationTokenizer`, the code
`build_datasets` runs) and the whole `build_datasets` (read JSONL, normalise, tokenise, save) with the
cache off. Tokenizers' own thread pool is turned off so that one worker uses one core. Besides wall-clock
conversations/s it reports conversations per CPU-second (this process plus its map workers), which is
what one worker achieves with a core to itself, even on a machine shared with other jobs.
--profile adds where one worker's time goes (template rendering, span finding, tokenizer, labels); the map
also reports chat-template renders per conversation.

--compare_tree DIR times the one-worker map of this checkout and of DIR's `dftune` package (another commit,
e.g. `git archive HEAD~1 dftune | tar -x -C DIR`) in child processes, in turns, and reports their ratio.

--sizes: for each N, a JSONL file of N synthetic conversations is built from scratch (`build_datasets` with a
cache) and then loaded from that cache, with each --workers value, each in a child process of its own so its
peak RSS (the process and, separately, the largest of its workers) is its own; with TRL importable, TRL's
preparation (`load_dataset("json")` then `SFTTrainer._prepare_dataset`, its cache reused the second time) on
the same file in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
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
    """System prompt + `turns` user/assistant exchanges, about 500 tiny-tokenizer tokens in all for 3 turns
    (about 330 for 2)."""

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

    from dftune.data.templates import ChatRenderer

    dataset = Dataset.from_list(rows)
    encoder = ConversationTokenizer(tokenizer, max_length)
    encoder.abilities, getattr(encoder, "layout", None)  # noqa: B018 - the template's one-off probes, not per conversation
    renders, render = [0], ChatRenderer.__call__

    def counted(self, *args, **kwargs):  # counts this process's renders: the whole map when workers == 1
        renders[0] += 1
        return render(self, *args, **kwargs)

    ChatRenderer.__call__ = counted
    try:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        tokenised = dataset.map(encoder.to_arrow, batched=True, batch_size=500, num_proc=workers if workers > 1 else None,
                                remove_columns=["messages"], new_fingerprint=f"bench-{workers}-{time.time()}")
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    finally:
        ChatRenderer.__call__ = render
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
        "renders_per_conversation": round(renders[0] / len(rows), 3) if workers == 1 else None,
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


def _descendants_peak_kib(pid: int) -> int:
    """The largest peak RSS (VmHWM) among the live descendants of `pid` (Linux /proc; 0 elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    peak, todo = 0, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo += children.get(child, [])
        try:
            with open(f"/proc/{child}/status") as f:
                peak = max(peak, next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0))
        except OSError:
            continue
    return peak


class WorkerMemory:
    """Samples the peak RSS of this process's descendants (workers started through a fork server are not
    children that getrusage sees) every 0.2 s on a thread, while in use."""

    def __enter__(self):
        import threading

        self.peak_kib, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.2):
            self.peak_kib = max(self.peak_kib, _descendants_peak_kib(os.getpid()))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def peak_rss_mib(workers: WorkerMemory | None = None) -> dict:
    """Peak resident memory of this process and of the largest of its workers (finished children, or the
    descendants `workers` sampled)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    largest = max(children.ru_maxrss, workers.peak_kib if workers else 0)
    return {"peak_rss_mib": round(own.ru_maxrss / 1024, 1), "peak_rss_mib_largest_worker": round(largest / 1024, 1)}


def write_synthetic_file(path: str, count: int, turns: int, seed: int = 0) -> None:
    """`count` synthetic conversations as JSON lines, written as they are made (1M of them never in memory)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            f.write(json.dumps(synthetic_conversation(rng, turns), ensure_ascii=False) + "\n")


def measure(kind: str, path: str, tokenizer_dir: str, workers: int, max_length: int, cache_dir: str) -> dict:
    """One measurement in this (child) process: "build" (first build_datasets into an empty cache), "cached"
    (build_datasets reusing it), "trl" (TRL's preparation of the same file), or "map" (the tokenising map)."""
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer

    disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ensure_chat_template(tokenizer)
    if kind == "map":
        rows = [record for _, record, _ in iter_records(path)]
        return bench_map(rows, tokenizer, workers, max_length)
    started = time.perf_counter()
    with WorkerMemory() as worker_memory:
        rows = _prepare(kind, path, tokenizer, workers, max_length, cache_dir)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "conversations_per_s": round(rows / seconds, 1), **peak_rss_mib(worker_memory)}


def _prepare(kind: str, path: str, tokenizer, workers: int, max_length: int, cache_dir: str) -> int:
    """The preparation `measure` times; returns the number of rows it gave."""
    if kind == "trl":
        from datasets import load_dataset
        from trl import SFTConfig, SFTTrainer

        dataset = load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
        config = SFTConfig(output_dir=cache_dir, dataset_num_proc=workers if workers > 1 else None, max_length=max_length,
                           packing=False, report_to=[], use_cpu=True, bf16=False)
        # The preparation SFTTrainer runs in __init__ (convert, tokenise, truncate), without a model to build:
        # the three attributes it reads, as __init__ sets them for a chat template without generation tags.
        trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=None)
        prepared = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, config, False, None, "train")
        rows = len(prepared)
    else:
        data_args = SimpleNamespace(data_files=[path], eval_data_files=None, max_length=max_length, preprocessing_num_workers=workers,
                                    validation_split_percentage=0, strict_data=False, data_cache_dir=cache_dir)
        train, _, report = build_datasets(data_args, tokenizer, None)
        rows = len(train)
        if report["cache"]["reused"] != (kind == "cached"):
            raise RuntimeError(f"{kind}: the cache was {'reused' if report['cache']['reused'] else 'not reused'}")
    return rows


def in_child(kind: str, path: str, args, workers: int, cache_dir: str = "", tree: str | None = None) -> dict:
    """`measure` in a fresh Python process (its own peak RSS); with `tree`, importing that checkout's dftune."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
    command = [sys.executable, os.path.abspath(__file__), "--measure", kind, "--data_files", path, "--tokenizer", args.tokenizer,
               "--workers", str(workers), "--max_length", str(args.max_length), "--cache_dir", cache_dir]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} ({workers} workers) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling(args) -> list[dict]:
    """Per N and workers: first build and cached load (and TRL's preparation where installed), each in a child."""
    import importlib.util

    with_trl = importlib.util.find_spec("trl") is not None and not args.skip_trl
    results = []
    with tempfile.TemporaryDirectory(dir=args.scratch_dir) as directory:
        for count in args.sizes:
            path = os.path.join(directory, f"synthetic-{count}.jsonl")
            write_synthetic_file(path, count, args.turns)
            for workers in args.workers:
                cache = os.path.join(directory, f"cache-{count}-{workers}")
                entry = {"conversations": count, "workers": workers, "first_build": in_child("build", path, args, workers, cache),
                         "cached": in_child("cached", path, args, workers, cache)}
                if with_trl:
                    trl_cache = os.path.join(directory, f"trl-{count}-{workers}")
                    entry["trl_first"] = in_child("trl", path, args, workers, trl_cache)
                    entry["trl_cached"] = in_child("trl", path, args, workers, trl_cache)
                    entry["first_build_speedup_over_trl"] = round(entry["trl_first"]["seconds"] / entry["first_build"]["seconds"], 2)
                results.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)  # progress: a 1M run takes a while
                shutil.rmtree(cache, ignore_errors=True)
            os.remove(path)
    return results


def compare_trees(records: list[dict], args, rounds: int = 2) -> dict:
    """The one-worker tokenising map and first build_datasets with this checkout and with --compare_tree, in
    turns (the machine's load drifts): each round's numbers and the ratios of the medians (this / other)."""
    runs: dict[str, dict[str, list[dict]]] = {tree: {"map": [], "build": []} for tree in ("this", "other")}
    with tempfile.TemporaryDirectory(dir=args.scratch_dir) as directory:
        path = os.path.join(directory, "compare.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        for round_index in range(rounds):
            for name, tree in (("this", None), ("other", args.compare_tree)):
                runs[name]["map"].append(in_child("map", path, args, 1, tree=tree))
                cache = os.path.join(directory, f"cache-{name}-{round_index}")
                runs[name]["build"].append(in_child("build", path, args, 1, cache, tree=tree))
                shutil.rmtree(cache, ignore_errors=True)

    def median(name: str, kind: str) -> float:
        values = sorted(run["conversations_per_s"] for run in runs[name][kind])
        return values[len(values) // 2]

    return {"other_tree": args.compare_tree, "rounds": runs,
            "map_ratio": round(median("this", "map") / median("other", "map"), 2),
            "build_ratio": round(median("this", "build") / median("other", "build"), 2)}


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
    parser.add_argument("--compare_tree", default=None, help="A folder holding another checkout's dftune package: its one-worker map "
                        "is timed in turns with this checkout's, and the ratio reported.")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="Scaling mode: time and peak RSS of the first build and the cached load per number of conversations.")
    parser.add_argument("--skip_trl", action="store_true", help="With --sizes: do not time TRL's preparation even where TRL is installed.")
    parser.add_argument("--turns", type=int, default=None, help="User/assistant exchanges per synthetic conversation "
                        "(default 3, about 500 tokens; 2, about 330 tokens, with --sizes).")
    parser.add_argument("--scratch_dir", default=None, help="Where the data files and caches of --sizes go (default: the temp dir).")
    parser.add_argument("--measure", choices=["build", "cached", "trl", "map"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core
    if args.measure:  # a child of --sizes or --compare_tree: one measurement, one JSON line
        result = measure(args.measure, args.data_files[0], args.tokenizer, args.workers[0], args.max_length, args.cache_dir)
        print(json.dumps(result))
        return result
    if args.sizes:
        args.turns = args.turns or 2
        result = {"tokenizer": args.tokenizer, "cpu_count": os.cpu_count(), "turns": args.turns,
                  "load_average_before": os.getloadavg()[0], "scaling": scaling(args), "load_average_after": os.getloadavg()[0]}
        print(json.dumps(result, indent=2))
        return result

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
        records = rows = [synthetic_conversation(rng, args.turns or 3) for _ in range(args.num_conversations)]
    result = {"tokenizer": args.tokenizer, "fast_tokenizer": bool(tokenizer.is_fast), "conversations": len(rows),
              "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()[0], "tokenise_map": [], "build_datasets": []}
    if args.compare_tree:
        result["compare_tree"] = compare_trees(records, args)
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
