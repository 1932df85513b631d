"""The data report: what happened to every record of every file (read = kept + skipped, by reason, with
file:line examples), the token statistics, and the table the log and dft-inspect print (data_report.json).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from dftune.data.spans import TRUNCATED_TO_NOTHING

MAX_EXAMPLES = 3  # file:line examples kept per (file, reason)


@dataclass
class FileReport:
    """What happened to the records of one input file. read == kept + sum(skipped.values())."""

    path: str
    split: str = "train"
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "file:line"
    adjusted: Counter = field(default_factory=Counter)  # kept records changed to fit the template, by note
    extra_examples: int = 0  # examples beyond one per kept record (one per turn, history-rewriting templates)
    examples_lost_to_truncation: int = 0  # examples (turns) of kept records with no supervised token left

    def skip(self, reason: str, where: str, max_examples: int = MAX_EXAMPLES) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < max_examples:
            shown.append(where)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "split": self.split,
            "read": self.read,
            "kept": self.kept,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped.most_common()),
            "examples": {reason: self.examples[reason] for reason, _ in self.skipped.most_common()},
            "adjusted_by_note": dict(self.adjusted.most_common()),
            "extra_examples": self.extra_examples,
            "examples_lost_to_truncation": self.examples_lost_to_truncation,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FileReport:
        return cls(data["path"], data["split"], data["read"], data["kept"], Counter(data["skipped_by_reason"]), dict(data["examples"]),
                   Counter(data.get("adjusted_by_note", {})), data.get("extra_examples", 0), data.get("examples_lost_to_truncation", 0))


def _percentile(lengths: np.ndarray, q: float) -> int:
    return int(np.percentile(lengths, q, method="nearest")) if len(lengths) else 0


def _token_summary(stats: list[dict], reports: list[FileReport], max_length: int) -> dict:
    lengths = np.concatenate([s["lengths"] for s in stats]) if stats else np.zeros(0, dtype=np.int64)
    return {
        "conversations": int(len(lengths)),
        "total_tokens": sum(s["tokens"] for s in stats),
        "supervised_tokens": sum(s["supervised_tokens"] for s in stats),
        "length_p50": _percentile(lengths, 50),
        "length_p90": _percentile(lengths, 90),
        "length_p99": _percentile(lengths, 99),
        "length_max": int(lengths.max()) if len(lengths) else 0,
        "max_length": max_length,
        "truncated": sum(s["truncated"] for s in stats),
        "dropped_after_truncation": sum(r.skipped[TRUNCATED_TO_NOTHING] for r in reports),
    }


def _totals(files: list[dict]) -> dict:
    by_reason: Counter = Counter()
    for file_report in files:
        by_reason.update(file_report["skipped_by_reason"])
    return {
        "read": sum(f["read"] for f in files),
        "kept": sum(f["kept"] for f in files),
        "skipped": sum(f["skipped"] for f in files),
        "skipped_by_reason": dict(by_reason.most_common()),
    }


def format_data_report(report: dict) -> str:
    """The data report as a table for the log (what a person reads before spending GPU hours)."""
    files = report["files"]
    width = max([len("total")] + [len(f["path"]) for f in files])
    lines = [f"{'file':<{width}}  split      read      kept   skipped"]
    for f in files:
        lines.append(f"{f['path']:<{width}}  {f['split']:<5} {f['read']:>9,} {f['kept']:>9,} {f['skipped']:>9,}")
        for reason, count in f["skipped_by_reason"].items():
            examples = ", ".join(f["examples"].get(reason, []))
            lines.append(f"    {count:>7,} x {reason}  (e.g. {examples})")
        for note, count in f.get("adjusted_by_note", {}).items():
            lines.append(f"    {count:>7,} kept, adjusted: {note}")
        if f.get("extra_examples"):
            lines.append(f"    {f['extra_examples']:>7,} extra examples, one per assistant turn (the template rewrites earlier turns)")
        if f.get("examples_lost_to_truncation"):
            lines.append(f"    {f['examples_lost_to_truncation']:>7,} example(s) of kept records lost to truncation to --max_length "
                         "(turns with no supervised token left)")
    totals = report.get("totals") or _totals(files)
    lines.append(f"{'total':<{width}}        {totals['read']:>9,} {totals['kept']:>9,} {totals['skipped']:>9,}")
    tokens = report["tokens"]
    lines.append(
        f"tokens: {tokens['total_tokens']:,} total, {tokens['supervised_tokens']:,} supervised over "
        f"{tokens['conversations']:,} conversations; length p50 {tokens['length_p50']}, p90 {tokens['length_p90']}, "
        f"p99 {tokens['length_p99']}, max {tokens['length_max']}"
    )
    lines.append(
        f"truncated to --max_length {tokens['max_length']}: {tokens['truncated']:,} "
        f"(dropped for it, no supervised token left: {tokens['dropped_after_truncation']:,})"
    )
    if "splits" in report:
        splits = report["splits"]
        lines.append(f"train {splits['train']:,} / eval {splits['eval']:,} conversations"
                     + (f" (eval from {splits['eval_from']})" if splits["eval_from"] else ""))
    if report.get("ignored_files"):
        lines.append(f"ignored (not a data file): {', '.join(report['ignored_files'])}")
    if "packing" in report:
        packing = report["packing"]
        lines.append(
            f"packing: {packing['conversations']:,} conversations in {packing['rows']:,} rows of at most "
            f"{packing['max_length']:,} tokens, efficiency {packing['efficiency']:.1%} (real tokens / rows x max_length)"
        )
    if "cache" in report and report["cache"]["path"]:
        lines.append(f"cache: {'reused' if report['cache']['reused'] else 'written'} {report['cache']['path']}")
    return "\n".join(lines)


def write_data_report(report: dict, output_dir: str) -> str:
    """Writes `output_dir/data_report.json`; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "data_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    return path
