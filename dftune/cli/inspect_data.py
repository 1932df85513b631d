"""Show one conversation as the trainer sees it: rendered, with its supervised tokens highlighted.

    dft-inspect --model_name_or_path assets/tiny-qwen2 --data_files data/sample --index 3

Supervised tokens are shown in green on a terminal and between [[ ]] otherwise (--color forces either).
Also prints the conversation's token counts and, per file, the records read, kept and skipped by reason,
counted by the training pipeline itself (reading and tokenising), so they match data_report.json.
Exit code 2 with one line on bad input, like train_dft.py.
"""

from __future__ import annotations

import argparse
import sys

from dftune.arguments import DataArguments
from dftune.data.build import _build_and_save, load_conversations
from dftune.data.encoding import ConversationTokenizer, format_supervision, supervision_runs
from dftune.data.files import DataError, check_data_file, resolve_data_files
from dftune.data.formats import FormatOptions
from dftune.data.report import format_data_report
from dftune.data.spans import MaskingOptions
from dftune.data.tokenizer import prepare_tokenizer

GREEN, RESET = "\033[1;32m", "\033[0m"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True, help="Model (tokenizer) directory.")
    parser.add_argument("--data_files", nargs="+", required=True, help="Files, directories or globs, as for train_dft.py.")
    parser.add_argument("--index", type=int, default=0, help="Which valid conversation to show (0-based, over all files in order).")
    parser.add_argument("--max_length", type=int, default=2048, help="Truncation length, as for train_dft.py.")
    parser.add_argument("--chat_template", default=None, help="As for train_dft.py: a .jinja file or a built-in name (chatml).")
    parser.add_argument("--chat_template_kwargs", default=None, help="As for train_dft.py: JSON object of template variables.")
    parser.add_argument("--train_on_turns", default="all", choices=["all", "last"], help="As for train_dft.py.")
    parser.add_argument("--dpo_chosen_as_sft", action="store_true", help="As for train_dft.py.")
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
        data_args = DataArguments(data_files=args.data_files, max_length=args.max_length, chat_template=args.chat_template,
                                  chat_template_kwargs=args.chat_template_kwargs, train_on_turns=args.train_on_turns,
                                  dpo_chosen_as_sft=args.dpo_chosen_as_sft)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        prepare_tokenizer(tokenizer, data_args)
        formats = FormatOptions(dpo_chosen_as_sft=data_args.dpo_chosen_as_sft)
        encoder = ConversationTokenizer(tokenizer, args.max_length, MaskingOptions.from_args(data_args))
        conversations, _ = load_conversations(args.data_files, formats=formats)
        files, _ = resolve_data_files(args.data_files)
        for path in files:
            check_data_file(path)
        report = _build_and_save(None, files, [], False, encoder, None, formats)["report"]
        if not 0 <= args.index < len(conversations):
            raise DataError(f"--index {args.index}: there are {len(conversations)} valid conversations (0..{len(conversations) - 1})")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    row = conversations[args.index]
    source = files[row["source"]]
    encoded = encoder.tokenize(row["messages"], row["tools"])
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"=== conversation {args.index} ({source}:{row['line']}), {len(row['messages'])} messages ===")
    if encoded["drop_reason"]:
        print(f"DROPPED at tokenisation: {encoded['drop_reason']}")
    else:
        print(highlight(tokenizer, encoded["input_ids"], encoded["labels"], color))
        print(f"=== tokens: {encoded['length']}, supervised: {encoded['supervised']}, "
              f"truncated to --max_length {args.max_length}: {'yes' if encoded['truncated'] else 'no'} ===")
    for file in report["files"]:
        skipped = ", ".join(f"{count} {reason} (e.g. {file['examples'][reason][0]})" for reason, count in file["skipped_by_reason"].items())
        print(f"{file['path']}: read {file['read']}, kept {file['kept']}, skipped {file['skipped']}" + (f": {skipped}" if skipped else ""))
    print(format_data_report(report))
    return 0


def cli() -> None:
    """The `dft-inspect` console script."""
    sys.exit(main())

if __name__ == "__main__":
    cli()
