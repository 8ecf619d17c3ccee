"""How a stage's student is spread over processes: one process, DDP (default) or FSDP2.

Only the trainable modules are ever sharded (M-MATE branches, fusion, LoRA adapters): the frozen tensors stay
shared with the teacher, so FSDP saves exactly what grows with training (float32 master weights, gradients,
AdamW state). Checkpoints always hold full tensors, so a run can resume with the same number of processes
whatever the strategy.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from linmu_cli.errors import LinmuError


def is_dtensor(t: torch.Tensor) -> bool:
    """A parameter (or grad norm) sharded by FSDP2."""
    return hasattr(t, "full_tensor")


class Single:
    """One process: nothing to wrap or gather."""

    def prepare(self, student: nn.Module) -> None:
        pass

    def wrap(self, objective: nn.Module) -> nn.Module:
        return objective

    def no_sync(self, wrapped: nn.Module, last_micro_step: bool):
        return nullcontext()

    def full_trainable(self, student: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}

    def optimizer_state(self, student: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, student: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    @property
    def shards(self) -> bool:
        return False


class DDP(Single):
    """Replicated student, gradients all-reduced by torch's DistributedDataParallel."""

    def wrap(self, objective: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(objective, device_ids=None, broadcast_buffers=False)

    def no_sync(self, wrapped: nn.Module, last_micro_step: bool):
        return nullcontext() if last_micro_step else wrapped.no_sync()


class FSDP(Single):
    """Trainable modules sharded with FSDP2 (`fully_shard`); every rank sees full tensors in checkpoints."""

    def prepare(self, student: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        targets = []
        for layer in student.family.decoder_layers(student):
            for child in ("flex", "swin", "fuse"):
                module = getattr(layer.self_attn, child, None)
                if module is not None and all(p.requires_grad for p in module.parameters()):
                    targets.append(module)
        # LoRA: the per-adapter Linear layers inside peft's lora_A / lora_B containers
        targets += [
            m for n, m in student.named_modules() if n.rpartition(".")[0].endswith((".lora_A", ".lora_B"))
        ]
        for module in targets:
            fully_shard(module)
        loose = [n for n, p in student.named_parameters() if p.requires_grad and not is_dtensor(p)]
        if loose:
            raise LinmuError(f"FSDP: trainable parameters outside a sharded module: {loose[:3]}")

    def full_trainable(self, student: nn.Module) -> dict[str, torch.Tensor]:
        # collective: every rank must call it
        return {
            n: (p.full_tensor() if is_dtensor(p) else p).detach().cpu()
            for n, p in student.named_parameters()
            if p.requires_grad
        }

    def optimizer_state(self, student: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(self, student: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            student, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )

    @property
    def shards(self) -> bool:
        return True


def strategy(name: str, world: int) -> Single:
    if world == 1 or not dist.is_initialized():
        return Single()
    return {"ddp": DDP, "fsdp": FSDP}[name]()
