"""Readers for what the trackers wrote offline, for the tracking tests (no tracker server involved).

wandb (`run-*.wandb`) and swanlab (`run-*.swanlab`) both store a run as a LevelDB log: a 7-byte file
header, then 32 KiB blocks of records framed as (crc32 u32, length u16, type u8) + payload, a payload
being one protobuf `Record` of the library's own schema.
"""

from __future__ import annotations

import glob
import os
import struct

BLOCK = 32768
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def leveldb_records(path: str, file_header: bytes) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(file_header), f"{path}: not a {file_header!r} log"
    records, pending, pos = [], b"", 7
    while pos + RECORD_HEADER <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER:  # the tail of a block is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        pos += RECORD_HEADER
        if kind == 0 and length == 0:
            break
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def only(pattern: str) -> str:
    matches = glob.glob(pattern)
    assert len(matches) == 1, f"expected exactly one {pattern}, found {matches}"
    return matches[0]


def wandb_offline_run(wandb_parent: str) -> dict:
    """History keys, config keys and the final summary of the one offline run under WANDB_PARENT/wandb/."""
    import json

    from wandb.proto import wandb_internal_pb2

    run_dir = only(os.path.join(wandb_parent, "wandb", "offline-run-*"))
    history: dict[str, list] = {}
    config: dict[str, object] = {}
    summary: dict[str, object] = {}
    for raw in leveldb_records(only(os.path.join(run_dir, "run-*.wandb")), b":W&B"):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) or item.key
                history.setdefault(key, []).append(json.loads(item.value_json))
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for update in updates:
                config["/".join(update.nested_key) or update.key] = json.loads(update.value_json)
        elif kind == "summary":
            for update in record.summary.update:
                summary["/".join(update.nested_key) or update.key] = json.loads(update.value_json)
    return {"dir": run_dir, "history": history, "config": config, "summary": summary}


def swanlab_offline_run(log_dir: str) -> dict:
    """Scalar series and config of the one swanlab run under LOG_DIR."""
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    run_dir = only(os.path.join(log_dir, "run-*"))
    scalars: dict[str, list] = {}
    finished = False
    for raw in leveldb_records(only(os.path.join(run_dir, "run-*.swanlab")), b":SWL"):
        record = Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "scalar":
            scalars.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
        finished = finished or kind == "finish"
    with open(os.path.join(run_dir, "files", "config.yaml"), encoding="utf-8") as f:
        config = {key: entry["value"] for key, entry in yaml.safe_load(f).items()}
    return {"dir": run_dir, "scalars": scalars, "config": config, "finished": finished}


def tensorboard_scalars(logging_dir: str) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """(tag -> [(step, value)], text tags) from the event files in LOGGING_DIR (not its subfolders)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    only(os.path.join(logging_dir, "events.out.tfevents.*"))
    accumulator = EventAccumulator(logging_dir)
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, list(tags.get("tensors", []))
