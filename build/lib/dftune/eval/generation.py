"""Generation-based evaluation: does the model answer the task? (`--eval_generation_files`)

Each record of a generation file (JSONL, or a JSON array) holds the prompt as `messages` (every turn
before the answer) or `prompt` text (one user turn), and the reference `answer`. At every evaluation the
model answers each prompt (greedy, or `--eval_generation_samples K` samples at
`--eval_generation_temperature`), the answer is extracted and checked (eval/answers.py), and metrics
join the evaluation's:

    eval_gen_accuracy            correct outputs / outputs (the mean over samples; pass@1)
    eval_gen_<file-stem>_accuracy   the same per file, when there are several files (names: metric_stems)
    eval_gen_pass@k              unbiased pass@k (Chen et al. 2021) for k = 1, 2, 4, ... and K, when K > 1
    eval_gen_finished            outputs that ended with an end-of-turn token, not the token limit
    eval_gen_mean_tokens         generated tokens per output (the end-of-turn token included)

Generation is batched with left padding and the KV cache, from the model's own generation config
(repetition penalty, top_k/top_p when sampling, its eos tokens) with the decoding flags on top, and stops
at the end-of-turn token. Distributed: prompt i goes to rank i % world_size; outputs are gathered to every
rank, keyed by (prompt, sample), so none is counted twice or lost and every rank gets the same metrics.
Under ZeRO-3 every forward is a collective: ranks run the same number of `generate` calls (a short shard
is filled with a repeated prompt whose output is dropped) with `synced_gpus`, so no rank waits forever.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dftune.data.spans import fold_system_prompt
from dftune.eval.answers import MATCHERS, AnswerMatcher, matcher_help, parse_matcher

logger = logging.getLogger("dft.eval")

GENERATIONS_DIR = "generations"
# End-of-turn tokens of common chat templates (ChatML/Qwen, Llama 3, Phi-3, Gemma); stops when in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class GenerationFileError(ValueError):
    """A generation file the user must fix: the message names file:line and the field."""


@dataclass
class GenerationEvalArguments:
    """Task accuracy by generation at every evaluation (and in dft-eval)."""

    eval_generation_files: list[str] = field(
        default=None,
        metadata={
            "help": "JSONL (or JSON array) files of prompts with reference answers: each record has `messages` "
            "(every turn before the answer) or `prompt` (one user turn) and `answer`. Generated and scored at every "
            "evaluation (--eval_strategy) and at the end; works with or without --eval_data_files."
        },
    )
    eval_answer_match: str = field(
        default="math",
        metadata={
            "help": f"How an output is checked against `answer`: {matcher_help()}. "
            "The answer is searched after </think> when present."
        },
    )
    eval_generation_samples: int = field(
        default=1,
        metadata={"help": "Outputs per prompt. K > 1 samples (needs --eval_generation_temperature > 0) and reports pass@k."},
    )
    eval_generation_temperature: float = field(
        default=0.0, metadata={"help": "0 = greedy decoding (default); > 0 samples at this temperature."}
    )
    eval_generation_max_new_tokens: int = field(
        default=256, metadata={"help": "Token limit per output; an output that reaches it counts as not finished."}
    )
    eval_generation_batch_size: int = field(
        default=16, metadata={"help": "Prompts per generate() call on each process (left-padded, KV cache)."}
    )
    eval_generation_max_prompts: int = field(
        default=None, metadata={"help": "Use only the first N prompts of each file (default: all)."}
    )

    def __post_init__(self):
        self.matcher: AnswerMatcher = parse_matcher(self.eval_answer_match)
        if self.eval_generation_samples < 1:
            raise ValueError(f"--eval_generation_samples must be >= 1, got {self.eval_generation_samples}.")
        if self.eval_generation_temperature < 0:
            raise ValueError(f"--eval_generation_temperature must be >= 0, got {self.eval_generation_temperature}.")
        if self.eval_generation_samples > 1 and self.eval_generation_temperature == 0:
            raise ValueError(
                "--eval_generation_samples > 1 needs sampling: give --eval_generation_temperature > 0 (e.g. 0.7); "
                "greedy decoding would repeat one output."
            )
        if self.eval_generation_max_new_tokens < 1:
            raise ValueError(f"--eval_generation_max_new_tokens must be >= 1, got {self.eval_generation_max_new_tokens}.")
        if self.eval_generation_batch_size < 1:
            raise ValueError(f"--eval_generation_batch_size must be >= 1, got {self.eval_generation_batch_size}.")
        if self.eval_generation_max_prompts is not None and self.eval_generation_max_prompts < 1:
            raise ValueError(f"--eval_generation_max_prompts must be >= 1, got {self.eval_generation_max_prompts}.")


@dataclass
class GenerationPrompt:
    """One prompt of a generation file: where it came from, the conversation so far, the reference."""

    file: str  # the file's metric name (its stem)
    location: str  # file:line, for error messages and the generations file
    prompt: Any  # as given: text or messages
    messages: list[dict[str, str]]
    reference: str


# ---- reading prompt files ---------------------------------------------------------------------------
def _records(path: str):
    """(line number, parsed record) of a generation file, read as data files are (data_files.iter_records):
    JSON lines or a JSON array (each record named by the line it starts on), gzipped or not, or Parquet."""
    from dftune.data.files import DataError, iter_records

    try:
        for number, record, error in iter_records(path):
            if error is not None:
                detail = getattr(error, "detail", None)
                raise GenerationFileError(f"{path}:{number}: not valid JSON ({detail or error}); one JSON object per line")
            yield number, record
    except DataError as err:
        raise GenerationFileError(str(err).replace("--data_files", "--eval_generation_files")) from None


def _prompt_from_record(record: Any, where: str) -> tuple[Any, list[dict[str, str]], str]:
    if not isinstance(record, dict):
        raise GenerationFileError(f"{where}: a record must be a JSON object with `messages` or `prompt`, and `answer`")
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise GenerationFileError(f"{where}: field `answer` is missing or empty; give the reference answer as text or a number")
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        )
        if not ok:
            raise GenerationFileError(f"{where}: field `messages` must be a non-empty list of {{role, content}} turns")
        if messages[-1]["role"] == "assistant":
            raise GenerationFileError(
                f"{where}: field `messages` ends with an assistant turn; give every turn before the answer (the answer goes in `answer`)"
            )
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        return messages, turns, answer
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationFileError(f"{where}: field `prompt` (text) or `messages` is required")
    return prompt, [{"role": "user", "content": prompt}], answer


def _metric_word(name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")


def metric_stem(path: str) -> str:
    """A file's name for metric keys: the stem, lower case, [a-z0-9_] only, without a leading `gen_` (the
    metric prefix says it already: gen_held.jsonl gives eval_gen_held_accuracy, not eval_gen_gen_held_...)."""
    stem = _metric_word(os.path.basename(path).split(".")[0]) or "file"
    return re.sub(r"^gen_+", "", stem) or stem


def metric_stems(paths: list[str]) -> list[str]:
    """Distinct metric names for the files: stems shared by several files (gsm8k/test.jsonl, math/test.jsonl)
    get their folder's name in front (gsm8k_test, math_test), then a number if still shared."""
    stems = [metric_stem(path) for path in paths]
    names = [
        stem if stems.count(stem) == 1 else "_".join(filter(None, [_metric_word(os.path.basename(os.path.dirname(os.path.abspath(path)))), stem]))
        for path, stem in zip(paths, stems)
    ]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        if names.count(name) > 1:  # the same file twice, or folders of one name
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}_{seen[name]}"
        unique.append(name)
    return unique


def read_generation_files(paths: list[str], max_prompts: int | None = None) -> list[GenerationPrompt]:
    """Every prompt of every file, in file order.

    Raises:
        GenerationFileError: a missing file, invalid JSON or a bad record (the message names file:line:field).
    """
    prompts: list[GenerationPrompt] = []
    for path, stem in zip(paths, metric_stems(paths)):
        if not os.path.isfile(path):
            raise GenerationFileError(f"{path}: generation file not found; check --eval_generation_files")
        file_prompts = []
        for number, record in _records(path):
            where = f"{path}:{number}"
            prompt, messages, answer = _prompt_from_record(record, where)
            file_prompts.append(GenerationPrompt(stem, where, prompt, messages, answer))
            if max_prompts is not None and len(file_prompts) >= max_prompts:
                break
        if not file_prompts:
            raise GenerationFileError(f"{path}: no prompts; check --eval_generation_files")
        prompts += file_prompts
    return prompts


# ---- scoring ----------------------------------------------------------------------------------------
def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k from `samples` outputs of which `correct` are right: 1 - C(n-c, k) / C(n, k)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def pass_at_k_values(samples: int) -> list[int]:
    """The k reported for K samples: 1, 2, 4, ... below K, and K."""
    ks = [1 << i for i in range(samples.bit_length()) if (1 << i) < samples]
    return ks + [samples]


def generation_metrics(records: list[dict], samples: int, prefix: str = "eval") -> dict[str, float]:
    """Metrics of gathered generation records (one per prompt and sample), as sums divided once."""
    if not records:
        return {}
    metrics = {
        f"{prefix}_gen_accuracy": sum(r["correct"] for r in records) / len(records),
        f"{prefix}_gen_finished": sum(r["finished"] for r in records) / len(records),
        f"{prefix}_gen_mean_tokens": sum(r["tokens"] for r in records) / len(records),
    }
    files = sorted({r["file"] for r in records})
    if len(files) > 1:
        for stem in files:
            mine = [r for r in records if r["file"] == stem]
            metrics[f"{prefix}_gen_{stem}_accuracy"] = sum(r["correct"] for r in mine) / len(mine)
    if samples > 1:
        per_prompt: dict[int, list[bool]] = {}
        for r in records:
            per_prompt.setdefault(r["index"], []).append(r["correct"])
        for k in pass_at_k_values(samples):
            values = [pass_at_k(len(c), sum(c), k) for c in per_prompt.values()]
            metrics[f"{prefix}_gen_pass@{k}"] = sum(values) / len(values)
    return metrics


# ---- generation -------------------------------------------------------------------------------------
def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The model's eos tokens, the tokenizer's eos, and any known end-of-turn token in the vocabulary."""
    ids: list[int] = []
    eos = generation_config.eos_token_id
    for token_id in (eos if isinstance(eos, list) else [eos]) + [tokenizer.eos_token_id]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def build_generation_config(model, tokenizer, args: GenerationEvalArguments):
    """The model's generation config with our decoding flags on top (greedy unless a temperature is given)."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.eos_token_id = stop_token_ids(tokenizer, config)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id[0]
    config.max_new_tokens = args.eval_generation_max_new_tokens
    config.max_length = None
    config.use_cache = True
    config.num_return_sequences = args.eval_generation_samples
    if args.eval_generation_temperature > 0:
        config.do_sample = True
        config.temperature = args.eval_generation_temperature
    else:
        # Greedy: sampling knobs of the model's config would only raise warnings.
        config.do_sample = False
        config.temperature, config.top_p, config.top_k, config.min_p = None, None, None, None
    return config


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids, attention_mask), both (B, T), padded on the left."""
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, longest - len(row):] = 1
    return input_ids, attention_mask


def cut_at_stop(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """An output's tokens up to and including the first stop token, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1], True
    return tokens, False


@torch.no_grad()
def generate_batch(model, rows: list[list[int]], config, synced_gpus: bool = False) -> list[list[list[int]]]:
    """Generates for a batch of prompt rows; per prompt, its K outputs' new tokens (ending at the first stop)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(rows, config.pad_token_id)  # (B, T)
    sequences = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
        synced_gpus=synced_gpus,
    )  # (B * K, T + new), each prompt's K samples adjacent
    new_tokens = sequences[:, input_ids.shape[1]:].tolist()
    stops = set(config.eos_token_id)
    samples = config.num_return_sequences or 1
    outputs = [cut_at_stop(tokens, stops)[0] for tokens in new_tokens]
    return [outputs[i * samples:(i + 1) * samples] for i in range(len(rows))]


class GenerationEvaluator:
    """Generates for every prompt of the files and scores the outputs; one per run (the prompts are read once).

    Raises (at construction):
        GenerationFileError: a bad generation file.
    """

    def __init__(self, args: GenerationEvalArguments, tokenizer, prompts: list[GenerationPrompt] | None = None,
                 chat_template_kwargs: dict | None = None):
        self.args = args
        self.tokenizer = tokenizer
        # --chat_template_kwargs: prompts are rendered as the training data was (e.g. enable_thinking).
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.prompts = prompts if prompts is not None else read_generation_files(args.eval_generation_files, args.eval_generation_max_prompts)
        self.prompt_ids = [self._encode(p) for p in self.prompts]

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs)

    def _encode(self, prompt: GenerationPrompt) -> list[int]:
        """The prompt rendered as training renders conversations: a system turn the template rejects
        (Mistral v0.1) is folded into the first user turn.

        Raises:
            GenerationFileError: the template cannot render the prompt (naming its file:line).
        """
        try:
            text = self._render(prompt.messages)
        except Exception as err:  # jinja's raise_exception, type errors in templates, ...
            text = None
            if prompt.messages[0]["role"] == "system":
                with contextlib.suppress(Exception):
                    text = self._render(fold_system_prompt(prompt.messages))
            if text is None:
                raise GenerationFileError(
                    f"{prompt.location}: the chat template cannot render this prompt ({str(err).splitlines()[0][:120]})"
                ) from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, model, rank: int = 0, world_size: int = 1, synced_gpus: bool = False, seed: int = 0) -> list[dict]:
        """This rank's records: prompts i with i % world_size == rank, K outputs each.

        With `synced_gpus` every rank makes the same number of generate calls (ZeRO-3: each forward is collective).
        """
        config = build_generation_config(model, self.tokenizer, self.args)
        stops = set(config.eos_token_id)
        mine = list(range(rank, len(self.prompts), world_size))
        # Similar lengths together: less padding. The order does not change any output.
        mine.sort(key=lambda i: len(self.prompt_ids[i]))
        batch_size = self.args.eval_generation_batch_size
        calls = math.ceil(math.ceil(len(self.prompts) / world_size) / batch_size) if synced_gpus else math.ceil(len(mine) / batch_size)
        was_training = model.training
        model.eval()
        records: list[dict] = []
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            # Sampling must not move the training RNG (dropout, data order): a forked, seeded RNG.
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + rank)
                for call in range(calls):
                    batch = mine[call * batch_size:(call + 1) * batch_size]
                    rows = [self.prompt_ids[i] for i in batch] or [self.prompt_ids[0]]  # filler, dropped
                    outputs = generate_batch(model, rows, config, synced_gpus=synced_gpus)
                    for index, samples in zip(batch, outputs):
                        records += [self._record(index, k, tokens, stops) for k, tokens in enumerate(samples)]
        finally:
            model.train(was_training)
        return records

    def _record(self, index: int, sample: int, tokens: list[int], stops: set[int]) -> dict:
        prompt = self.prompts[index]
        finished = bool(tokens) and tokens[-1] in stops
        output = self.tokenizer.decode(tokens, skip_special_tokens=True)
        extracted = self.args.matcher.extract(output)
        return {
            "index": index, "sample": sample, "file": prompt.file, "location": prompt.location,
            "prompt": prompt.prompt, "reference": prompt.reference, "output": output, "extracted": extracted,
            "correct": self.args.matcher.is_correct(extracted, prompt.reference), "finished": finished,
            "tokens": len(tokens),
        }

    def evaluate(self, model, accelerator=None, prefix: str = "eval", seed: int = 0) -> tuple[dict[str, float], list[dict]]:
        """Generates on every rank, gathers, and returns (metrics, every record in prompt order) on every rank."""
        rank = accelerator.process_index if accelerator is not None else 0
        world_size = accelerator.num_processes if accelerator is not None else 1
        started = time.perf_counter()
        records = self.generate(model, rank, world_size, synced_gpus=world_size > 1 and is_zero3(accelerator), seed=seed)
        if world_size > 1:
            from accelerate.utils import gather_object

            records = gather_object(records)
        unique = {(r["index"], r["sample"]): r for r in records}  # keyed: nothing counted twice
        records = [unique[key] for key in sorted(unique)]
        expected = len(self.prompts) * self.args.eval_generation_samples
        if len(records) != expected:
            raise RuntimeError(f"generation evaluation gathered {len(records)} outputs, expected {expected}")
        seconds = time.perf_counter() - started
        metrics = generation_metrics(records, self.args.eval_generation_samples, prefix)
        tokens = sum(r["tokens"] for r in records)
        logger.info(
            "generation eval: %d prompts x %d, %d tokens in %.1fs (%.0f tokens/s), accuracy %.4f",
            len(self.prompts), self.args.eval_generation_samples, tokens, seconds, tokens / max(seconds, 1e-9),
            metrics[f"{prefix}_gen_accuracy"],
        )
        return metrics, records


def is_zero3(accelerator=None) -> bool:
    """DeepSpeed ZeRO-3 is on: parameters are partitioned, so every forward is a collective."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def write_generations(records: list[dict], path: str) -> str:
    """One JSON line per prompt and sample: prompt, reference, output, extracted, correct (and where it came from)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


__all__ = [
    "MATCHERS", "GenerationEvalArguments", "GenerationEvaluator", "GenerationFileError", "generation_metrics",
    "pass_at_k", "read_generation_files", "write_generations",
]
