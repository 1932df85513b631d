"""Sequence parallelism: DeepSpeed's Ulysses (ALST) through accelerate's ParallelismConfig, for the DFT loss family.

`--sequence_parallel_size S` splits every sequence into S equal shards, one per rank of a sequence-parallel
group; attention swaps the sequence shard for a head shard with an all-to-all (DeepSpeed's
`UlyssesSPAttentionHF`, registered by accelerate), so each rank holds activations for T/S tokens. The
data-parallel degree is processes / S.

What this project adds to what transformers does with it (whose own loss path ignores a subclass's loss
and `num_items_in_batch` and averages per sample):
- Data: DeepSpeed's loader adapter gathers one batch from each rank of the group, shards each and hands
  them out in turn, so a group works through S batches one after another; labels are shifted before
  sharding (`shift_labels`), so the target of a shard's last token is the next shard's first token. The
  collator adds position_ids (global positions, which the all-to-all needs) and pads T to a multiple of S.
- Loss: each rank computes sum_t w_t * CE_t over its shard's tokens and divides by N, the supervised tokens
  of the whole optimizer step summed over every rank (data-parallel ranks, sequence shards and
  accumulation micro-batches). DeepSpeed sums gradients over the sequence group and averages them over
  the data-parallel group (or, ZeRO-3 before deepspeed 0.20.2, over all ranks), so the loss is multiplied
  by that divisor (`gradient_divisor`) and the step's gradient is exactly sum_all(w_t * dCE_t) / N.
- Metrics are sums over tokens, reduced over all ranks in `log()`: token-weighted over whole sequences.
- Evaluation and generation run whole sequences on every rank (accelerate turns SP off in eval mode); the
  anchored loss's reference model is sharded like the policy (loss/reference.py).
"""

from __future__ import annotations

# Attention kernels Ulysses can call on the gathered sequence (eager would need a T x T mask).
SP_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# Those that keep packed conversations apart under SP: Ulysses drops the attention mask, and only the flash
# kernels derive document boundaries from the (gathered) position_ids.
SP_PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3")


def check_sequence_parallel_flags(size: int, attn_implementation: str, packing: bool, deepspeed, world_size: int) -> None:
    """Raises ValueError (one line naming the flags) when --sequence_parallel_size cannot run as asked."""
    if size < 1:
        raise ValueError(f"--sequence_parallel_size must be >= 1, got {size}.")
    if size == 1:
        return
    flag = f"--sequence_parallel_size {size}"
    if not deepspeed:
        raise ValueError(f"{flag} runs DeepSpeed's Ulysses: add --deepspeed ds_config/zero3.json (or zero2.json), "
                         "or DS_CONFIG=... with scripts/train.sh.")
    if world_size % size:
        raise ValueError(f"{flag} needs a multiple of {size} processes, got {world_size}: launch {size} x k processes "
                         "(NUM_GPUS / NUM_PROCS), or lower --sequence_parallel_size.")
    if attn_implementation not in SP_ATTENTION:
        raise ValueError(f"{flag} with --attn_implementation {attn_implementation}: Ulysses needs {' or '.join(SP_ATTENTION)} "
                         "(eager would build a full T x T mask).")
    if packing and attn_implementation not in SP_PACKING_ATTENTION:
        raise ValueError(f"{flag} with --packing and --attn_implementation {attn_implementation}: sequence parallelism drops "
                         "the attention mask, so packed conversations would attend to each other; use --attn_implementation "
                         "flash_attention_2, or drop --packing.")


def check_model_heads(config, size: int) -> None:
    """Raises ValueError unless the model's attention heads split over `size` ranks."""
    if size <= 1:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % size or (kv_heads % size and size % kv_heads):
        raise ValueError(f"--sequence_parallel_size {size}: the model's {heads} attention heads ({kv_heads} key/value heads) "
                         f"do not split over {size} ranks; pick a size that divides {heads} (and divides or is a multiple "
                         f"of {kv_heads}).")


def parallelism_config(size: int, attn_implementation: str):
    """accelerate's ParallelismConfig for Ulysses over `size` ranks (None when size is 1). Eval mode runs
    whole sequences per rank (sp_disable_in_eval), as Trainer's evaluation and generation need."""
    if size <= 1:
        return None
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(
        sp_attn_implementation=attn_implementation, sp_seq_length_is_variable=True, sp_disable_in_eval=True
    )
    return ParallelismConfig(sp_size=size, sp_backend="deepspeed", sp_handler=handler)


def sequence_parallel_size(accelerator) -> int:
    config = getattr(accelerator, "parallelism_config", None)
    if config is None or config.sp_backend != "deepspeed" or not config.sp_enabled:
        return 1
    return int(config.sp_size)


def gradient_divisor(accelerator) -> int:
    """What DDP / DeepSpeed divide the sum of the ranks' gradients by: the number of processes without
    sequence parallelism; with it the data-parallel degree (DeepSpeed sums over the sequence group), or every
    rank under ZeRO-3 before deepspeed 0.20.2 (deepspeedai/DeepSpeed#8854; transformers rescales the same way)."""
    processes = accelerator.num_processes
    size = sequence_parallel_size(accelerator)
    if size == 1:
        return processes
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import importlib.metadata

        from packaging import version

        if version.parse(importlib.metadata.version("deepspeed")) < version.parse("0.20.2"):
            return processes
    return processes // size


# ---- data: DeepSpeed's loader adapter over gloo ------------------------------------------------------
PAD_VALUES = {"labels": -100, "attention_mask": 0}


class EqualLengthBatches:
    """Pads each batch of a DataLoader to `rows` sequences and, with `equal_lengths`, to the longest of its
    sequence group (rounded to a multiple of S).

    Ulysses' attention is built for a fixed micro-batch size, so an epoch's last, smaller batch would stop the
    run: it gets rows with no supervised token. DeepSpeed's adapter all-gathers the group's batches, whose
    lengths differ; NCCL takes that, gloo (CPU) refuses ("invalid tensor size"). Padding goes after every real
    token or row (labels -100, attention_mask 0, position_ids counting on), so it changes no real token's
    logits, no loss term and no token count.
    """

    def __init__(self, dataloader, group, size: int, rows: int, equal_lengths: bool):
        self.dataloader, self.group, self.size, self.rows, self.equal_lengths = dataloader, group, size, rows, equal_lengths

    def __len__(self):
        return len(self.dataloader)

    def __getattr__(self, name):  # sampler, dataset, set_epoch, ...: the wrapped loader's
        return getattr(self.dataloader, name)

    def __iter__(self):
        import torch
        import torch.distributed as dist

        for batch in self.dataloader:
            if batch["input_ids"].shape[0] < self.rows:
                batch = {key: _pad_rows(key, value, self.rows) for key, value in batch.items()}
            if self.equal_lengths:
                length = torch.tensor([batch["input_ids"].shape[1]], dtype=torch.int64)
                dist.all_reduce(length, op=dist.ReduceOp.MAX, group=self.group)
                target = -(-int(length) // self.size) * self.size
                batch = {key: _pad_to(key, value, target) for key, value in batch.items()}
            yield batch


def _pad_rows(key: str, value, rows: int):
    import torch

    if not torch.is_tensor(value) or value.dim() < 2 or value.shape[0] >= rows:
        return value
    extra = rows - value.shape[0]
    if key == "position_ids":
        tail = torch.arange(value.shape[1], dtype=value.dtype, device=value.device).expand(extra, -1)
    else:
        tail = value.new_full((extra, *value.shape[1:]), PAD_VALUES.get(key, 0))
    return torch.cat([value, tail], dim=0)


def _pad_to(key: str, value, target: int):
    import torch

    if not torch.is_tensor(value) or value.dim() < 2 or value.shape[1] >= target:
        return value
    short = target - value.shape[1]
    if key == "position_ids":  # (B, T): count on from each row's last position
        tail = value[:, -1:] + 1 + torch.arange(short, dtype=value.dtype, device=value.device)
    else:
        tail = value.new_full((value.shape[0], short, *value.shape[2:]), PAD_VALUES.get(key, 0))
    return torch.cat([value, tail], dim=1)


def ulysses_dataloader_adapter(accelerator, rows: int):
    """A replacement for `accelerator.deepspeed_ulysses_dl_adapter`: DeepSpeed's adapter (`sequence_parallel_loader`)
    over batches of `rows` sequences (--per_device_train_batch_size), of equal lengths on gloo."""

    def adapter(dataloader, model):
        import torch.distributed as dist
        from deepspeed.utils import groups

        size, group = groups._get_sequence_parallel_world_size(), groups._get_sequence_parallel_group()
        dataloader = EqualLengthBatches(dataloader, group, size, rows, equal_lengths=dist.get_backend() == "gloo")
        return sequence_parallel_loader(dataloader, groups._get_sequence_parallel_rank(), group, size, model.device)

    return adapter


def sequence_parallel_loader(dataloader, rank: int, group, size: int, device):
    """DeepSpeed's UlyssesSPDataLoaderAdapter plus what Trainer needs of a training loader: `set_epoch` (a new
    shuffle each epoch) and `skipped` (exact resume mid-epoch; Trainer's skip_first_batches needs a DataLoader)."""
    from accelerate import skip_first_batches
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    class SequenceParallelLoader(UlyssesSPDataLoaderAdapter):
        def set_epoch(self, epoch: int) -> None:
            if hasattr(self.dl, "set_epoch"):
                self.dl.set_epoch(epoch)

        def skipped(self, num_batches: int):
            """This loader past its first `num_batches` shards: each batch of the wrapped loader gives S of them."""
            batches, shards = divmod(num_batches, self.sp_world_size)
            inner = self.dl
            if isinstance(inner, EqualLengthBatches):
                inner = EqualLengthBatches(skip_first_batches(inner.dataloader, batches), inner.group, inner.size, inner.rows,
                                           inner.equal_lengths)
            else:
                inner = skip_first_batches(inner, batches)
            loader = sequence_parallel_loader(inner, self.sp_rank, self.sp_group, self.sp_world_size, self.device)
            for _ in range(shards):  # a collective on every rank of the group alike
                next(loader)
            return loader

    return SequenceParallelLoader(dataloader, sp_rank=rank, sp_group=group, sp_world_size=size, device=device)
