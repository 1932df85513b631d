"""Peak memory and time of the loss step alone (forward + backward): full vs chunked, per loss type.

    python scripts/bench_loss.py                         # CPU: small shapes, one subprocess per case
    python scripts/bench_loss.py --seq_lens 2048 8192 16384 32768 --vocabs 32000 151936 --hidden 1536  # GPU
    python scripts/bench_loss.py --loss_types dft asft eaft --out bench_loss.json

One case = hidden states (T, H) from a "backbone" (a leaf that requires grad), an LM-head weight
(V, H), labels with ~90% of positions supervised, and the anchor's reference hidden states and LM
head (no grad); the step is loss + backward. The variants run on identical inputs:
  - none:          the same step with the loss removed (sum of the hidden states): the memory floor
  - full[_TYPE]:   logits for every position (and the reference's for asft), then `dft_loss_from_logits`
  - chunked[_TYPE]: `dft_loss_from_hidden` (`--loss_impl chunked`), the reference's logits chunk by chunk
TYPE is each of --loss_types but dft (plain `full` / `chunked`). Reported: peak memory above the
inputs (GPU: torch.cuda.max_memory_allocated; CPU: the peak RSS of a fresh subprocess minus that of
the `none` case), median time over --repeats, the ratio to the `none` case, the chunked/full loss
agreement, and for every other type its extra memory and time over dft on the same path. Prints one
JSON document.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from dftune.loss.chunked import dft_loss_from_hidden
from dftune.loss.core import LossSpec, dft_loss_from_logits

SPECS = {"dft": LossSpec(), "asft": LossSpec(loss_type="asft", anchor_kl_coef=0.1), "eaft": LossSpec(loss_type="eaft")}


def variants(loss_types: list[str]) -> list[str]:
    names = ["none"]
    for loss_type in loss_types:
        suffix = "" if loss_type == "dft" else f"_{loss_type}"
        names += [f"full{suffix}", f"chunked{suffix}"]
    return names


def make_inputs(seq_len: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden_states = (torch.randn(1, seq_len, hidden, generator=generator) * 0.5).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, seq_len), generator=generator)
    labels[torch.rand(1, seq_len, generator=generator) < 0.1] = -100
    # The reference model's last hidden states and LM head: near the policy's, never differentiated.
    ref_hidden = (hidden_states.detach() + 0.05 * torch.randn(1, seq_len, hidden, generator=generator).to(device, dtype))
    ref_weight = weight.detach().clone()
    return hidden_states, weight, labels.to(device), ref_hidden, ref_weight


def step(variant: str, hidden_states, weight, labels, ref_hidden, ref_weight, chunk_size: int) -> float:
    path, _, loss_type = variant.partition("_")
    spec = SPECS[loss_type or "dft"]
    if variant == "none":
        loss = hidden_states.float().sum() * 0.0
    elif path == "full":
        logits = hidden_states @ weight.t()  # (1, T, V) in the model dtype, as an LM head makes it
        with torch.no_grad():
            ref_logits = ref_hidden @ ref_weight.t() if spec.anchored else None  # the reference model's output
        loss = dft_loss_from_logits(logits, labels, spec, ref_logits=ref_logits).loss
    else:
        reference = (ref_hidden, ref_weight, None) if spec.anchored else None
        loss = dft_loss_from_hidden(hidden_states, weight, labels, spec, chunk_size=chunk_size, reference=reference).loss
    loss.backward()
    value = loss.item()
    hidden_states.grad = None
    weight.grad = None
    return value


def run_case(variant: str, seq_len: int, vocab: int, hidden: int, dtype_name: str, device: str, chunk_size: int, repeats: int) -> dict:
    dtype = getattr(torch, dtype_name)
    inputs = make_inputs(seq_len, vocab, hidden, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step(variant, *inputs, chunk_size)  # warm-up
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = step(variant, *inputs, chunk_size)
        sync()
        times.append(time.perf_counter() - start)
    result = {"variant": variant, "seq_len": seq_len, "vocab": vocab, "hidden": hidden, "dtype": dtype_name,
              "device": device, "chunk_size": chunk_size, "median_s": statistics.median(times), "loss": value}
    if device == "cuda":
        result["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", type=int, nargs="+", default=None, help="Token counts (default: CPU 1024 2048, GPU 2048..32768).")
    parser.add_argument("--vocabs", type=int, nargs="+", default=None, help="Vocabulary sizes (default: CPU 32000, GPU 32000 151936).")
    parser.add_argument("--hidden", type=int, default=None, help="Hidden size (default: CPU 128, GPU 1536).")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: CPU float32, GPU bfloat16).")
    parser.add_argument("--chunk_size", type=int, default=512, help="--loss_chunk_size for the chunked variant.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions per case (median reported).")
    parser.add_argument("--loss_types", nargs="+", default=["dft"], choices=sorted(SPECS), help="Loss types to run (dft always first).")
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    parser.add_argument("--_case", nargs=6, help=argparse.SUPPRESS)  # internal: run one CPU case in this process
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args._case:
        variant, seq_len, vocab, hidden, dtype_name, chunk = args._case
        print(json.dumps(run_case(variant, int(seq_len), int(vocab), int(hidden), dtype_name, device, int(chunk), args.repeats)))
        return

    gpu = device == "cuda"
    seq_lens = args.seq_lens or ([2048, 8192, 16384, 32768] if gpu else [1024, 2048])
    vocabs = args.vocabs or ([32000, 151936] if gpu else [32000])
    hidden = args.hidden or (1536 if gpu else 128)
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    loss_types = ["dft"] + [t for t in args.loss_types if t != "dft"]
    rows = []
    for vocab in vocabs:
        for seq_len in seq_lens:
            case = {}
            for variant in variants(loss_types):
                if gpu:
                    try:
                        case[variant] = run_case(variant, seq_len, vocab, hidden, dtype_name, device, args.chunk_size, args.repeats)
                    except torch.cuda.OutOfMemoryError:
                        case[variant] = {"variant": variant, "oom": True}
                    torch.cuda.empty_cache()
                else:  # a fresh process per case, so its peak RSS is its own
                    command = [sys.executable, __file__, "--repeats", str(args.repeats), "--_case", variant, str(seq_len), str(vocab), str(hidden), dtype_name, str(args.chunk_size)]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    case[variant] = json.loads(output.strip().splitlines()[-1])
            memory_key = "peak_gib" if gpu else "peak_rss_gib"
            floor = case["none"].get(memory_key)
            for variant in variants(loss_types)[1:]:
                entry = case[variant]
                if entry.get("oom") or floor is None:
                    continue
                entry["extra_memory_gib_vs_no_loss"] = entry[memory_key] - floor
                entry["time_vs_no_loss"] = entry["median_s"] / max(case["none"]["median_s"], 1e-9)
                path, _, loss_type = variant.partition("_")
                dft = case[path]
                if loss_type and not dft.get("oom"):  # what this loss type costs over DFT on the same path
                    entry["extra_memory_gib_vs_dft"] = entry[memory_key] - dft[memory_key]
                    entry["time_vs_dft"] = entry["median_s"] / max(dft["median_s"], 1e-9)
            if not case["full"].get("oom") and not case["chunked"].get("oom"):
                case["chunked"]["loss_rel_diff_vs_full"] = abs(case["chunked"]["loss"] - case["full"]["loss"]) / abs(case["full"]["loss"])
                case["chunked"]["memory_ratio_vs_full"] = (
                    case["chunked"]["extra_memory_gib_vs_no_loss"] / max(case["full"]["extra_memory_gib_vs_no_loss"], 1e-9)
                )
                case["chunked"]["time_ratio_vs_full"] = case["chunked"]["median_s"] / case["full"]["median_s"]
            rows.extend(case.values())
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__, "results": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
