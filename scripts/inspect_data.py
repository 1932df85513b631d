"""Show one conversation as the trainer sees it: rendered, with its supervised tokens highlighted.

    python scripts/inspect_data.py --model_name_or_path assets/tiny-qwen2 --data_files data/sample --index 3

Supervised tokens are shown in green on a terminal and between [[ ]] otherwise (--color forces either).
Also prints the conversation's token counts and, per file, the records read, kept and skipped by reason
(skips found while reading; `train_dft.py` adds those found while tokenising to data_report.json).
Exit code 2 with one line on bad input, like train_dft.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils import (  # noqa: E402
    DataError,
    ConversationTokenizer,
    ensure_chat_template,
    format_supervision,
    load_conversations,
    supervision_runs,
)

GREEN, RESET = "\033[1;32m", "\033[0m"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True, help="Model (tokenizer) directory.")
    parser.add_argument("--data_files", nargs="+", required=True, help="Files, directories or globs, as for train_dft.py.")
    parser.add_argument("--index", type=int, default=0, help="Which valid conversation to show (0-based, over all files in order).")
    parser.add_argument("--max_length", type=int, default=2048, help="Truncation length, as for train_dft.py.")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="Highlight with ANSI colour (auto: on a terminal).")
    return parser.parse_args(argv)


def highlight(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    if not color:
        return format_supervision(tokenizer, input_ids, labels)
    return "".join(f"{GREEN}{text}{RESET}" if supervised else text for text, supervised in supervision_runs(tokenizer, input_ids, labels))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    except OSError as err:
        print(f"error: --model_name_or_path {args.model_name_or_path}: cannot load a tokenizer ({str(err).splitlines()[0]})", file=sys.stderr)
        return 2
    try:
        ensure_chat_template(tokenizer)
        conversations, reports = load_conversations(args.data_files)
        if not 0 <= args.index < len(conversations):
            raise DataError(f"--index {args.index}: there are {len(conversations)} valid conversations (0..{len(conversations) - 1})")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    row = conversations[args.index]
    source = reports[row["source"]].path
    encoded = ConversationTokenizer(tokenizer, args.max_length).tokenize(row["messages"])
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"=== conversation {args.index} ({source}:{row['line']}), {len(row['messages'])} messages ===")
    if encoded["drop_reason"]:
        print(f"DROPPED at tokenisation: {encoded['drop_reason']}")
    else:
        print(highlight(tokenizer, encoded["input_ids"], encoded["labels"], color))
        print(f"=== tokens: {encoded['length']}, supervised: {encoded['supervised']}, "
              f"truncated to --max_length {args.max_length}: {'yes' if encoded['truncated'] else 'no'} ===")
    for report in reports:
        skipped = ", ".join(f"{count} {reason} (e.g. {report.examples[reason][0]})" for reason, count in report.skipped.most_common())
        print(f"{report.path}: read {report.read}, kept {report.kept}, skipped {sum(report.skipped.values())}" + (f": {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
