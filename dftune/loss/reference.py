"""The anchor's reference model for `--loss_type asft`: the starting weights, never trained.

- With `--use_lora`: the policy itself with its adapters disabled (peft's `disable_adapter()`): no
  copy, the base weights are frozen anyway.
- Otherwise: a frozen copy of the starting weights in the training dtype, made before the first step
  (so also before a checkpoint is resumed), outside the optimizer. Under DeepSpeed it is prepared the
  way TRL prepares DPO reference models: `deepspeed.initialize` without an optimizer, sharded under
  ZeRO-3 like the trained model (stage 0, a full copy per rank, under ZeRO-1/2).

Its forward gets the same inputs as the policy's (position_ids too, so packed rows work), under the
same autocast, without gradients. Under sequence parallelism those inputs are a shard of each sequence and
its attention must run sharded too: DeepSpeed's Ulysses attention is skipped for a module in eval mode
(so that evaluation runs whole sequences), so the frozen copy's attention modules are put in training
mode, with their attention dropout at 0, for the length of its forward.

At step 0 policy and reference compute bitwise the same logits, so the anchor is exactly 0.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from dftune.loss.chunked import forward_without_head, unwrap

logger = logging.getLogger("dft.reference")


def _is_zero3_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _zero3_copy(model, ds_config: dict):
    """A second ZeRO-3-partitioned model holding the same values as `model`, one tensor gathered at a time."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        copied = type(model)._from_config(model.config, dtype=next(model.parameters()).dtype)
    target = dict(copied.named_parameters())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param, target[name]], modifier_rank=0):
            if rank == 0:
                target[name].data.copy_(param.data)
    return copied


@contextlib.contextmanager
def _attention_in_training_mode(model):
    """Attention modules (those with an `attention_dropout`) in training mode without dropout, then back."""
    saved = [(m, m.training, m.attention_dropout) for m in model.modules() if hasattr(m, "attention_dropout")]
    try:
        for module, _, _ in saved:
            module.training, module.attention_dropout = True, 0.0
        yield
    finally:
        for module, training, dropout in saved:
            module.training, module.attention_dropout = training, dropout


class ReferenceModel:
    """Runs the reference forward for the anchored loss (see the module docstring).

    Args:
        frozen: the frozen copy, or None to use the policy with adapters disabled.
        autocast: a callable returning the policy's autocast context (accelerator.autocast).
    """

    def __init__(self, frozen: torch.nn.Module | None, autocast=contextlib.nullcontext):
        self.frozen = frozen
        self.autocast = autocast
        self._prepared = frozen is None
        self.sequence_parallel = False  # set by the trainer (see the module docstring)

    @classmethod
    def for_model(cls, model, ds_config: dict | None = None, autocast=contextlib.nullcontext) -> ReferenceModel:
        """The reference for `model` as the trainer received it (before accelerate prepares it)."""
        if hasattr(model, "disable_adapter"):  # a peft model: the base weights are the reference
            return cls(None, autocast)
        frozen = _zero3_copy(model, ds_config) if _is_zero3_partitioned(model) else copy.deepcopy(model)
        frozen.requires_grad_(False)
        frozen.eval()
        return cls(frozen, autocast)

    def prepare(self, accelerator) -> None:
        """Under DeepSpeed: `deepspeed.initialize` without an optimizer (as TRL does for DPO references),
        once the trainer has filled the config's "auto" values; else move the copy to the device."""
        if self._prepared:
            return
        self._prepared = True
        plugin = accelerator.state.deepspeed_plugin
        if plugin is None:
            self.frozen.to(accelerator.device)
            return
        import deepspeed

        config = copy.deepcopy(plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        # Under sequence parallelism the trainer's batch is per data-parallel group; DeepSpeed, given no mpu here,
        # would check it against every rank. A reference never steps: let DeepSpeed derive it.
        config.pop("train_batch_size", None)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}  # a full copy per rank; nothing to shard without training
        engine, *_ = deepspeed.initialize(model=self.frozen, config=config)
        engine.eval()
        self.frozen = engine
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
        full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
        logger.info("anchor reference: frozen copy under DeepSpeed stage %s, elements held on this rank: %d of %d",
                    config["zero_optimization"]["stage"], held, full)

    def _context(self, policy):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(self.autocast())
        if self.frozen is None:
            stack.enter_context(policy.disable_adapter())
        elif self.sequence_parallel:
            stack.enter_context(_attention_in_training_mode(self.frozen))
        return stack

    def _module(self, policy):
        return policy if self.frozen is None else self.frozen

    def logits(self, policy, inputs: dict) -> torch.Tensor:
        """(B, T, V) reference logits for `inputs`. `policy`: the unwrapped trained model."""
        with self._context(policy):
            return self._module(policy)(**inputs, use_cache=False).logits

    def hidden_and_head(self, policy, inputs: dict):
        """(last hidden state (B, T, H), LM head module) of the reference for `inputs`."""
        with self._context(policy):
            _, hidden, head = forward_without_head(self._module(policy), inputs)
        return hidden, head


__all__ = ["ReferenceModel", "unwrap"]
