"""Peak memory per rank against sequence length, without and with sequence parallelism (JSON out).

    python scripts/bench_sp.py                                   # CPU: L = 1024 2048 4096 8192, S = 1 and 2
    python scripts/bench_sp.py --seq_lengths 512 1024 --steps 2  # a quicker look
    python scripts/bench_sp.py --model_config qwen2.5-1.5b --seq_lengths 8192 16384 32768 \
        --enable_gradient_checkpointing True                     # GPU (2 cards): Qwen2.5-1.5B's shape, random init
    python scripts/bench_sp.py --model_config '{"num_hidden_layers": 8}'   # overrides of the default shape

What it runs: for each sequence length L and each S in --sp_sizes, one real `train_dft.py` run under the
deepspeed launcher on 2 processes (--procs) with the same ZeRO-3 config (--ds_config), batch 1 per rank,
--steps optimizer steps. S=1 is 2 data-parallel ranks, each holding a whole sequence; S=2 is one
sequence-parallel group (DeepSpeed Ulysses, --sequence_parallel_size 2), each rank holding half of every
sequence. So the only difference between the two is sharding. The data: synthetic conversations (one short
user turn, one long assistant turn) of L tokens under the model's tokenizer and chat template, written as
JSONL to a scratch folder; --max_length leaves them whole. The model: by default a small random-init Qwen2
(the bundled assets/tiny-qwen2 tokenizer and config, hidden 256, 4 layers, 4 heads, 2 key/value heads) so
that activations, not weights, dominate; --model_config names a real shape (random init) or overrides,
--model takes a model folder as it is.

Each rank measures itself (this script is also the launched script: `--_rank_shim DIR` runs train_dft.main
with a wrapped DFTTrainer.train and writes DIR/rank<N>.json):
  CPU  peak_mib            peak RSS of the rank's process (ru_maxrss), loading included;
       before_train_mib    RSS when trainer.train() is called (model, data, libraries; freed heap trimmed);
       growth_mib          peak RSS during train() (the high-water mark is reset at its start) - before_train_mib:
                           activations, gradients, optimizer state, communication buffers;
       step_growth_mib     the largest, over steps, of (peak RSS during the step - RSS at its start, freed heap
                           trimmed): once the optimizer state exists, what one step's forward and backward add.
  GPU  the same from torch.cuda.memory_allocated / max_memory_allocated (bf16), peak_mib is the training peak.
  Both saved_activations_mib  bytes of the tensors autograd keeps for backward in one model forward (weights
                           excluded; storages counted once): the activation memory exactly, free of allocator
                           effects. With --enable_gradient_checkpointing, only what is saved outside the
                           checkpointed layers (what the checkpoints keep is not seen).
On CPU the ranks run with MALLOC_MMAP_THRESHOLD_=65536 (--malloc_mmap_threshold): with glibc's default, dynamic
threshold, large freed tensors stay in the heap and the RSS measured the allocator's history more than the
step's live memory (at L=8192, with checkpointing, a step's growth read ~700 MiB instead of ~270); fixed, they
are unmapped when freed (a few percent slower steps).
The figures of a length are the largest over ranks. Also per run: seconds per optimizer step (steps after the
first; the first includes DeepSpeed's start-up), sequences per step (the data-parallel degree procs / S: S=1
trains 2 sequences a step, S=2 one, each rank holding half of it), tokens_per_s (sequences x L / step_s, the
throughput to compare), and what each rank's model forward actually received (tokens_per_forward: L for S=1,
L/2 for S=2: the proof that the sequence was split).

How to read it: saved activations halve with S=2 (Ulysses shards every activation along T); step growth
and growth ratios (S=2 / S=1) come near 1/2 as L grows, above it by what does not shrink with S (optimizer
state, DeepSpeed's buffers, transient work space). The peak ratio is closer to 1 on CPU, where the process's
baseline (torch, DeepSpeed, the tokenizer: ~500 MiB) is in both; the growth is the part that scales with L.
A run that fails (out of memory, a timeout) is reported with ok=false and the tail of its output; the
benchmark goes on.
The JSON goes to stdout (and --output_json, default $OUT/bench_sp.json when $OUT is set), a table to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(ROOT, "assets", "tiny-qwen2")
MIB = 2**20
# Shapes applied over assets/tiny-qwen2's config (random init). "cpu-small" keeps the tiny tokenizer's vocabulary.
PRESETS = {
    "cpu-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
}
WORDS = (
    "the model learns to answer questions about data training loss tokens gradient batch step rate weight "
    "layer attention head vector matrix value python code file line error result example because when "
    "which there their would could should about after before during between under again further"
).split()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_lengths", type=int, nargs="+", default=None,
                        help="Conversation lengths L in tokens (default: 1024 2048 4096 8192 on CPU, 8192 16384 32768 on GPU).")
    parser.add_argument("--sp_sizes", type=int, nargs="+", default=[1, 2], help="Values of --sequence_parallel_size to compare.")
    parser.add_argument("--procs", type=int, default=2,
                        help="Processes (ranks) of every run, whatever S: S=1 is data parallel over them.")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per run (the first is not timed).")
    parser.add_argument("--ds_config", default="ds_config/zero3.json",
                        help="DeepSpeed config of every run (relative to the repository).")
    parser.add_argument("--model", default=None,
                        help="A model folder to train as it is (its tokenizer too); overrides --model_config.")
    parser.add_argument("--model_config", default="cpu-small",
                        help=f"Random-init shape: a preset ({', '.join(PRESETS)}), or a JSON object (or .json file) of config "
                             "overrides applied over the cpu-small preset.")
    parser.add_argument("--enable_gradient_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=False,
                        help="Pass --enable_gradient_checkpointing True to the runs (recompute activations in backward).")
    parser.add_argument("--attn_implementation", default="sdpa",
                        help="--attn_implementation of the runs (sdpa or flash_attention_2).")
    parser.add_argument("--loss_impl", default="chunked", choices=["auto", "full", "chunked"], help="--loss_impl of the runs.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="cpu: --use_cpu True, fp32, peak RSS; cuda: bf16, torch.cuda peaks (needs --procs GPUs); "
                             "auto: cuda if available.")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=65536,
                        help="CPU: glibc's MALLOC_MMAP_THRESHOLD_ for the ranks, so that freed tensors leave the RSS (0: "
                             "glibc's own dynamic threshold, under which freed memory stays in the heap and the RSS "
                             "overstates the peak).")
    parser.add_argument("--extra", default="", help="More train_dft.py flags for every run, as one shell-quoted string.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic text and the model init.")
    parser.add_argument("--timeout", type=int, default=1800, help="Seconds before a run is stopped and reported as failed.")
    parser.add_argument("--work_dir", default=None,
                        help="Scratch folder for the model, data and runs (default: a new temporary one, removed afterwards).")
    parser.add_argument("--keep_work_dir", action="store_true", help="Keep the scratch folder (run logs, data) afterwards.")
    parser.add_argument("--output_json", default=None,
                        help="Also write the JSON here (default: $OUT/bench_sp.json if $OUT is set).")
    return parser.parse_args(argv)


# ---- model and data -------------------------------------------------------------------------------
def config_overrides(spec: str) -> dict:
    if spec in PRESETS:
        return dict(PRESETS[spec])
    text = open(spec, encoding="utf-8").read() if spec.endswith(".json") and os.path.isfile(spec) else spec
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError:
        raise SystemExit(f"error: --model_config {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a JSON object") from None
    return {**PRESETS["cpu-small"], **overrides}


def build_model(args, out_dir: str, max_positions: int, cuda: bool) -> dict:
    """A random-init Qwen2 of --model_config's shape beside the tiny tokenizer, saved to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    with open(os.path.join(TINY_MODEL, "config.json"), encoding="utf-8") as f:
        base = json.load(f)
    for key in ("layer_types", "architectures", "transformers_version", "dtype"):  # layer_types follows num_hidden_layers
        base.pop(key, None)
    overrides = config_overrides(args.model_config)
    rope_theta = overrides.pop("rope_theta", None)
    config = Qwen2Config(**{**base, **overrides, "max_position_embeddings": max_positions, "use_cache": False})
    if rope_theta:
        config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):  # initialising a large model on the GPU is much faster
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(out_dir)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if cuda:  # rank 0 shares the first GPU with this process: leave it nothing cached
        torch.cuda.empty_cache()
    return {"path": out_dir, "random_init": args.model_config, "parameters": parameters, **model_shape(config)}


def model_shape(config) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {key: getattr(config, key, None) for key in keys}


def chat_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:  # as prepare_tokenizer does for a base model
        from dftune.data.templates import CHATML_TEMPLATE

        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def token_count(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    return len(ids)


def synthetic_conversation(tokenizer, length: int, rng: random.Random) -> tuple[dict, int]:
    """One user turn and one long assistant turn whose tokenised conversation is as close to `length` as
    whole words allow (binary search over the number of words); returns (record, tokens)."""
    user = {"role": "user", "content": "Write a long essay about " + " ".join(rng.choice(WORDS) for _ in range(6)) + "."}
    words: list[str] = []

    def messages(n: int) -> list[dict]:
        return [user, {"role": "assistant", "content": " ".join(words[:n])}]

    while token_count(tokenizer, messages(len(words))) < length:  # enough words to pass the length
        words += [rng.choice(WORDS) for _ in range(max(64, len(words)))]
    low, high = 0, len(words)  # largest n with tokens(n) <= length
    while low < high:
        middle = (low + high + 1) // 2
        if token_count(tokenizer, messages(middle)) <= length:
            low = middle
        else:
            high = middle - 1
    return {"messages": messages(low)}, token_count(tokenizer, messages(low))


def write_data(tokenizer, length: int, count: int, path: str, seed: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + length)
    tokens = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            record, n = synthetic_conversation(tokenizer, length, rng)
            f.write(json.dumps(record) + "\n")
            tokens.append(n)
    return tokens


# ---- one run: the deepspeed launcher over this script's rank shim ---------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(procs: int, malloc_mmap_threshold: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", WANDB_MODE="offline", SWANLAB_MODE="offline")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))  # ranks share the cores
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if malloc_mmap_threshold > 0:  # fixed: every block above it is its own mapping, returned to the system when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    return env


def run_one(args, model_dir: str, data_file: str, length: int, sp_size: int, cuda: bool, work_dir: str) -> dict:
    run_dir = os.path.join(work_dir, f"L{length}_S{sp_size}")
    rank_dir = os.path.join(run_dir, "ranks")
    os.makedirs(rank_dir, exist_ok=True)
    train_args = [
        "--model_name_or_path", model_dir, "--data_files", data_file, "--output_dir", os.path.join(run_dir, "out"),
        "--overwrite_output_dir", "True", "--max_length", str(length + max(256, length // 8)), "--data_cache_dir", "none",
        "--max_steps", str(args.steps), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "True", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-5", "--seed", str(args.seed), "--dataloader_num_workers", "0",
        "--loss_impl", args.loss_impl, "--attn_implementation", args.attn_implementation,
        "--deepspeed", os.path.join(ROOT, args.ds_config), "--sequence_parallel_size", str(sp_size),
        "--enable_gradient_checkpointing", str(args.enable_gradient_checkpointing),
        *(["--bf16", "True"] if cuda else ["--use_cpu", "True"]), *shlex.split(args.extra),
    ]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.procs),
               "--master_port", str(free_port()), os.path.abspath(__file__), "--_rank_shim", rank_dir, *train_args]
    log_path = os.path.join(run_dir, "output.log")
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        # A session of its own, so that a timeout stops the launcher's ranks too.
        env = child_env(args.procs, 0 if cuda else args.malloc_mmap_threshold)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    wall = time.perf_counter() - started
    ranks = []
    for name in sorted(os.listdir(rank_dir)):
        with open(os.path.join(rank_dir, name), encoding="utf-8") as f:
            ranks.append(json.load(f))
    result = {"sp_size": sp_size, "ok": returncode == 0 and len(ranks) == args.procs, "returncode": returncode,
              "wall_s": round(wall, 1)}
    if not result["ok"]:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-25:]
        if returncode is None:
            why = f"timed out after {args.timeout} s"
        else:
            why = f"exit {returncode}" if returncode else f"{len(ranks)} of {args.procs} rank reports"
        return {**result, "error": why, "output_tail": tail}
    steps = ranks[0]["steps"]
    forwards = max(r["forwards"] for r in ranks)
    sequences = forwards * args.procs / sp_size / steps  # each forward of a rank: one sequence, or its 1/S shard
    step_s = max(r["step_s"] for r in ranks)
    result.update({
        "peak_mib": max(r["peak_mib"] for r in ranks),
        "before_train_mib": max(r["before_train_mib"] for r in ranks),
        "growth_mib": max(r["growth_mib"] for r in ranks),
        "step_growth_mib": max(r["step_growth_mib"] for r in ranks),
        "step_s": step_s,
        "first_step_s": max(r["first_step_s"] for r in ranks),
        "tokens_per_forward": max(r["tokens_per_forward"] for r in ranks),
        "saved_activations_mib": max(r["saved_activations_mib"] for r in ranks),
        "sequences_per_step": round(sequences, 2),
        "tokens_per_s": round(sequences * length / step_s, 1) if step_s else None,
        "per_rank": ranks,
    })
    return result


# ---- inside each launched rank ------------------------------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Lowers the process's RSS high-water mark (ru_maxrss) to its current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Returns freed heap to the system, so that RSS before training counts live memory only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rank_shim(rank_dir: str, train_argv: list[str]) -> None:
    """Runs train_dft.main(train_argv) in this launched rank, measuring DFTTrainer.train; writes rank_dir/rank<N>.json."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import TrainerCallback

    import train_dft
    from dftune.run.distributed import run_as_script
    from dftune.trainer import DFTTrainer

    cuda = torch.cuda.is_available() and "--use_cpu" not in train_argv
    rank = int(os.environ.get("RANK", "0"))

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def current() -> float:
        return torch.cuda.memory_allocated() / MIB if cuda else rss_mib()

    def reset_peak() -> bool:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            return True
        return reset_peak_rss()

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / MIB if cuda else peak_rss_mib()

    class StepMemory(TrainerCallback):
        def __init__(self):
            self.step_start, self.step_growth, self.step_peaks, self.ends = 0.0, [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_peaks.append(peak())  # the peak since the last reset, before it is reset again
            if not cuda:  # else the last step's freed activations, kept by malloc, would count as this step's start
                trim_heap()
            reset_peak()
            self.step_start = current()

        def on_step_end(self, args, state, control, **kwargs):
            step_peak = peak()
            self.step_peaks.append(step_peak)
            self.step_growth.append(step_peak - self.step_start)
            self.ends.append(now())

    forwards: list[int] = []
    saved: list[dict[int, int]] = []  # per forward: storage -> bytes of the tensors autograd keeps for backward
    saving: list = []

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):  # weights (gathered by ZeRO-3) are not activations
            try:
                storage = tensor.untyped_storage()
                saved[-1][storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested, ...): not counted
                pass
        return tensor

    def count_tokens(module, positional, kwargs):
        input_ids = kwargs.get("input_ids", positional[0] if positional else None)
        if input_ids is not None:
            forwards.append(int(input_ids.shape[-1]))
        saved.append({})
        saving.append(torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor))
        saving[-1].__enter__()

    def forward_done(module, positional, output):
        if saving:
            saving.pop().__exit__(None, None, None)

    original_train = DFTTrainer.train

    def measured_train(self, *args, **kwargs):
        trim_heap()
        load_peak = peak_rss_mib()
        if cuda:
            torch.cuda.empty_cache()
        before = current()
        reset = reset_peak()
        clock = StepMemory()
        self.add_callback(clock)
        hooks = [self.model.register_forward_pre_hook(count_tokens, with_kwargs=True),
                 self.model.register_forward_hook(forward_done)]
        started = now()
        try:
            return original_train(self, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            train_peak = max([peak(), *clock.step_peaks])
            stamps = [started, *clock.ends]
            intervals = [b - a for a, b in zip(stamps, stamps[1:])]
            timed = intervals[1:] or intervals  # the first step also starts DeepSpeed's engine
            report = {
                "rank": rank, "device": torch.cuda.get_device_name() if cuda else "cpu",
                "memory": "cuda_max_allocated" if cuda else "process_rss", "peak_reset": reset,
                "peak_mib": round(train_peak if cuda else max(load_peak, train_peak), 1),
                "train_peak_mib": round(train_peak, 1), "load_peak_mib": round(load_peak, 1),
                "before_train_mib": round(before, 1), "growth_mib": round(train_peak - before, 1),
                "step_growth_mib": round(max(clock.step_growth, default=0.0), 1),
                "step_growth_per_step_mib": [round(g, 1) for g in clock.step_growth],
                "steps": len(clock.ends), "first_step_s": round(intervals[0], 3) if intervals else None,
                "step_s": round(sum(timed) / len(timed), 3) if timed else None,
                "forwards": len(forwards), "tokens_per_forward": max(forwards, default=0),
                "saved_activations_mib": round(max((sum(f.values()) for f in saved), default=0) / MIB, 2),
            }
            with open(os.path.join(rank_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
                json.dump(report, f)

    DFTTrainer.train = measured_train
    DFTTrainer.save_model = lambda self, *args, **kwargs: None  # the benchmark keeps no weights
    run_as_script(lambda: train_dft.main(train_argv))


# ---- parent --------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--_rank_shim" in argv:  # a launched rank: `--_rank_shim DIR`, train_dft's flags and the launcher's --local_rank=N
        at = argv.index("--_rank_shim")
        rank_shim(argv[at + 1], argv[:at] + argv[at + 2 :])
        return {}
    args = parse_args(argv)
    stdout = sys.stdout
    # Only the JSON goes to stdout: what libraries print on the way (DeepSpeed's accelerator line) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        report = measure(args)
    print(json.dumps(report, indent=2), file=stdout, flush=True)
    print_table(report)
    output = args.output_json or (os.path.join(os.environ["OUT"], "bench_sp.json") if os.environ.get("OUT") else None)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def measure(args) -> dict:
    """Builds the model and data, runs every (L, S), returns the report."""
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.device_count() < args.procs:
        raise SystemExit(f"error: {args.procs} processes need {args.procs} GPUs, found {torch.cuda.device_count()} "
                         "(two ranks cannot share a GPU under NCCL); use --device cpu or a machine with more GPUs")
    bad = [s for s in args.sp_sizes if s < 1 or args.procs % s]
    if bad:
        raise SystemExit(f"error: --sp_sizes {bad}: each must divide --procs {args.procs}")
    lengths = args.seq_lengths or ([8192, 16384, 32768] if cuda else [1024, 2048, 4096, 8192])
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_sp_")
    os.makedirs(work_dir, exist_ok=True)
    try:
        if args.model:
            from transformers import AutoConfig

            model_dir = os.path.abspath(args.model)
            config = AutoConfig.from_pretrained(model_dir)
            model = {"path": model_dir, "random_init": None, **model_shape(config.get_text_config())}
        else:
            model_dir = os.path.join(work_dir, "model")
            model = build_model(args, model_dir, max(4096, 2 * max(lengths)), cuda)
        tokenizer = chat_tokenizer(model_dir)
        results = []
        for length in lengths:
            data_file = os.path.join(work_dir, f"data_{length}.jsonl")
            # More conversations than the runs take (procs / S per step: see sequences_per_step).
            tokens = write_data(tokenizer, length, args.steps * args.procs * 2 + 2, data_file, args.seed)
            entry = {"seq_length": length, "tokens": {"min": min(tokens), "max": max(tokens)}, "runs": {}}
            for sp_size in args.sp_sizes:
                run = run_one(args, model_dir, data_file, length, sp_size, cuda, work_dir)
                entry["runs"][str(sp_size)] = run
                print(f"L={length} S={sp_size}: " + (f"peak {run['peak_mib']:.0f} MiB, growth {run['growth_mib']:.0f} MiB, "
                      f"{run['step_s']} s/step" if run["ok"] else f"FAILED ({run['error']})"), file=sys.stderr, flush=True)
            first, *others = [entry["runs"][str(s)] for s in args.sp_sizes]
            for other in others:
                if first["ok"] and other["ok"]:
                    suffix = f"s{other['sp_size']}_s{first['sp_size']}"
                    entry[f"peak_ratio_{suffix}"] = round(other["peak_mib"] / first["peak_mib"], 3)
                    entry[f"growth_ratio_{suffix}"] = round(other["growth_mib"] / max(first["growth_mib"], 1e-9), 3)
                    entry[f"step_growth_ratio_{suffix}"] = round(
                        other["step_growth_mib"] / max(first["step_growth_mib"], 1e-9), 3)
            results.append(entry)
    finally:
        if not args.keep_work_dir and not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    report = {
        "benchmark": "bench_sp", "device": torch.cuda.get_device_name() if cuda else "cpu", "procs": args.procs,
        "sp_sizes": args.sp_sizes, "ds_config": args.ds_config, "steps": args.steps, "batch_per_rank": 1,
        "dtype": "bfloat16" if cuda else "float32", "attn_implementation": args.attn_implementation, "loss_impl": args.loss_impl,
        "gradient_checkpointing": args.enable_gradient_checkpointing, "model": model,
        "malloc_mmap_threshold": None if cuda or args.malloc_mmap_threshold <= 0 else args.malloc_mmap_threshold,
        "memory": "torch.cuda.max_memory_allocated per rank (MiB)" if cuda else "process RSS per rank (MiB)",
        "work_dir": work_dir if args.keep_work_dir or args.work_dir else None, "results": results,
    }
    return report


def print_table(report: dict) -> None:
    """Per length and S: peak and growth (max over ranks, MiB), seconds per step; then S/first-S ratios."""
    sizes = report["sp_sizes"]
    header = f"{'L':>7} " + " ".join(f"{f'S={s} peak':>11} {f'S={s} growth':>12} {f'S={s} s/step':>11}" for s in sizes)
    if len(sizes) > 1:
        header += f" {'growth ratio':>13} {'peak ratio':>11}"
    lines = [f"peak memory per rank ({report['memory']}), {report['procs']} processes, {report['device']}", header]
    for entry in report["results"]:
        cells = []
        for s in sizes:
            run = entry["runs"][str(s)]
            if run["ok"]:
                cells.append(f"{run['peak_mib']:>11.0f} {run['growth_mib']:>12.0f} {run['step_s']:>11.2f}")
            else:
                cells.append(f"{'FAILED: ' + run['error']:>36}")
        line = f"{entry['seq_length']:>7} " + " ".join(cells)
        if len(sizes) > 1:
            suffix = f"s{sizes[-1]}_s{sizes[0]}"
            growth, peak = entry.get(f"growth_ratio_{suffix}"), entry.get(f"peak_ratio_{suffix}")
            line += f" {growth if growth is not None else '-':>13} {peak if peak is not None else '-':>11}"
        lines.append(line)
    print("\n".join(lines), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
