"""How a stage's student is spread over processes: one process, DDP (default) or FSDP2.

Only the trainable modules are ever sharded (M-MATE branches, fusion, LoRA adapters): the frozen tensors stay
shared with the teacher, so FSDP saves exactly what grows with training (float32 master weights, gradients,
AdamW state). Checkpoints always hold full tensors and optimizer states (keyed by parameter index on one
process or DDP, by parameter name under FSDP; either loads into any strategy), so a run can resume with
another strategy or number of processes: FSDP shards the full tensors again for the new world.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from linmu_cli.errors import LinmuError


def _trainable_names(student: nn.Module) -> list[str]:
    """Names of the trainable parameters in optimizer order (the trainer passes them in this order)."""
    return [n for n, p in student.named_parameters() if p.requires_grad]


def by_index(student: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (FSDP's full state dict) re-keyed by index, as
    `Optimizer.load_state_dict` wants; a state keyed by index is returned as it is."""
    if all(isinstance(k, int) for k in state["state"]):
        return state
    index = {n: i for i, n in enumerate(_trainable_names(student))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def by_name(student: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `by_index`: an optimizer state keyed by index re-keyed by parameter name."""
    if not all(isinstance(k, int) for k in state["state"]):
        return state
    names = _trainable_names(student)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def is_dtensor(t: torch.Tensor) -> bool:
    """A parameter (or grad norm) sharded by FSDP2."""
    return hasattr(t, "full_tensor")


class Single:
    """One process: nothing to wrap or gather."""

    def prepare(self, student: nn.Module) -> None:
        pass

    def wrap(self, objective: nn.Module) -> nn.Module:
        return objective

    def no_sync(self, wrapped: nn.Module, last_micro_step: bool) -> AbstractContextManager:
        return nullcontext()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average gradients the wrapper did not synchronise (`per_layer`'s backward runs inside the objective,
        under `no_sync`): nothing to do on one process."""

    def full_trainable(self, student: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}

    def optimizer_state(self, student: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, student: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(by_index(student, state))

    @property
    def shards(self) -> bool:
        return False


class DDP(Single):
    """Replicated student, gradients all-reduced by torch's DistributedDataParallel."""

    def wrap(self, objective: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(objective, device_ids=None, broadcast_buffers=False)

    def no_sync(self, wrapped: nn.Module, last_micro_step: bool) -> AbstractContextManager:
        return nullcontext() if last_micro_step else wrapped.no_sync()

    def average_gradients(self, params: list[nn.Parameter], bucket: int = 2**26) -> None:
        """DDP's average (sum over processes / world), all-reduced in buckets of `bucket` elements."""
        grads = [p.grad for p in params if p.grad is not None]
        world = dist.get_world_size()
        start = 0
        while start < len(grads):
            end, size = start, 0
            while end < len(grads) and (end == start or size + grads[end].numel() <= bucket):
                size += grads[end].numel()
                end += 1
            group = grads[start:end]
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat.div_(world)
            for g, part in zip(group, flat.split([g.numel() for g in group]), strict=True):
                g.copy_(part.view_as(g))
            start = end


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
            student,
            optimizer,
            optim_state_dict=by_name(student, state),
            options=StateDictOptions(full_state_dict=True),
        )

    @property
    def shards(self) -> bool:
        return True


def strategy(name: str, world: int) -> Single:
    if world == 1 or not dist.is_initialized():
        return Single()
    return {"ddp": DDP, "fsdp": FSDP}[name]()
