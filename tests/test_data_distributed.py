"""Under a 2-process launch the main process tokenises first and the other rank reuses its cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from transformers import AutoTokenizer
    from dftune.arguments import DataArguments, DFTTrainingArguments
    from dftune.data.build import build_datasets

    rank = int(os.environ["RANK"])
    training_args = DFTTrainingArguments(output_dir={out!r}, use_cpu=True, report_to=[], ddp_backend="gloo")
    data_args = DataArguments(data_files={files!r}, max_length=64, data_cache_dir={cache!r})
    tokenizer = AutoTokenizer.from_pretrained({model!r})
    train, _, report = build_datasets(data_args, tokenizer, training_args)
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"cache": report["cache"], "rows": len(train), "first": train[0]["input_ids"]}}, f)
    """
)


@pytest.mark.distributed
def test_main_process_tokenises_first_and_the_other_rank_reuses_it(tmp_path, tiny_model_dir, sample_files):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(out), files=sample_files, cache=str(tmp_path / "cache"), model=tiny_model_dir))
    with socket.socket() as probe:  # a free port: other test runs may share this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["cache"]["reused"] is False and rank1["cache"] == {"path": rank0["cache"]["path"], "reused": True}
    assert rank0["rows"] == rank1["rows"] == 320 and rank0["first"] == rank1["first"]
    assert len(os.listdir(tmp_path / "cache")) == 1  # one entry, no leftover staging directory
