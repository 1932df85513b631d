"""Builds tests/fixtures/tokenizers/ from the real Qwen2.5 and Llama-3.2 tokenizers (xz-compressed, ~3 MB).

    REAL_OUT=/tmp/real_models python ../shared/real/build_models.py      # the real tokenizer folders
    python scripts/make_tokenizer_fixtures.py /tmp/real_models

Origin: the official Qwen2 byte-level BPE (Apache-2.0) and Meta's Llama 3 tiktoken ranks (Llama 3
Community Licence), converted to tokenizer.json by transformers; chat templates from the models'
tokenizer_config.json. Tests decompress them into a temporary folder (tests/conftest.py: real_tokenizer).
"""

from __future__ import annotations

import lzma
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"qwen2.5": "qwen2.5-instruct-tiny", "llama3.2": "llama3.2-instruct-tiny"}


def main(source: str) -> None:
    for name, folder in FOLDERS.items():
        out = os.path.join(ROOT, "tests", "fixtures", "tokenizers", name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(source, folder, "tokenizer.json"), "rb") as f, lzma.open(os.path.join(out, "tokenizer.json.xz"), "wb", preset=9) as g:
            g.write(f.read())
        for file in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(os.path.join(source, folder, file), os.path.join(out, file))
        print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/real_models")
