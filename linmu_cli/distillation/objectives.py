"""What a distillation step optimizes, as nn.Modules so DDP / FSDP can wrap them.

- `LayerwiseObjective` (stages 1-2): every student decoder layer gets the teacher's input to that layer
  (detached) and regresses the teacher's output of that layer; one teacher pass feeds all layers.
- `EndToEndObjective` (stage 3): the student runs the whole model; per-layer hidden-state regression plus
  token-level logit KL (and optional CE) against the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from linmu_cli.distillation.losses import logit_kl, next_token_ce, relative_mse, token_weights
from linmu_cli.distillation.recipe import LossConfig
from linmu_cli.layers.layout import TokenLayout


@dataclass
class TeacherPass:
    """What one frozen teacher forward provides to the student objectives."""

    layer_inputs: list[torch.Tensor]  # hidden state entering each decoder layer
    layer_outputs: list[torch.Tensor]  # hidden state leaving each decoder layer
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    logits: torch.Tensor | None


@torch.no_grad()
def run_teacher(teacher: nn.Module, layers: nn.ModuleList, batch: dict, want_logits: bool) -> TeacherPass:
    """One teacher forward, recording each decoder layer's input, output and rotary embeddings via hooks."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    rope: list = []

    def pre(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
        if not rope:
            rope.append(kwargs.get("position_embeddings"))

    def post(module, args, kwargs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(pre, with_kwargs=True),
                                                layer.register_forward_hook(post, with_kwargs=True))]  # fmt: skip
    try:
        out = teacher(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return TeacherPass(inputs, outputs, rope[0] if rope else None, out.logits if want_logits else None)


def run_student(student: nn.Module, batch: dict):
    """Student forward (with grad when enabled) returning (output, each decoder layer's output)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in student.family.decoder_layers(student)]
    try:
        out = student(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out, captured


class LayerwiseObjective(nn.Module):
    def __init__(self, student: nn.Module, loss: LossConfig, checkpointing: bool = False):
        super().__init__()
        self.student, self.loss_cfg, self.checkpointing = student, loss, checkpointing

    def forward(self, teacher: TeacherPass, layout: TokenLayout) -> dict[str, torch.Tensor]:
        weights = token_weights(layout.valid, layout.is_vision(), self.loss_cfg.vision_weight)
        layers = self.student.family.decoder_layers(self.student)
        per_layer = []
        for layer, h_in, h_out in zip(layers, teacher.layer_inputs, teacher.layer_outputs, strict=True):
            call = lambda h, layer=layer: layer(  # noqa: E731
                h, attention_mask=None, position_embeddings=teacher.position_embeddings, linmu_layout=layout
            )
            out = checkpoint(call, h_in, use_reentrant=False) if self.checkpointing else call(h_in)
            out = out[0] if isinstance(out, tuple) else out
            per_layer.append(relative_mse(out, h_out, weights))
        hidden = torch.stack(per_layer).mean()
        return {"loss": self.loss_cfg.hidden * hidden, "hidden": hidden.detach()}


class EndToEndObjective(nn.Module):
    def __init__(self, student: nn.Module, loss: LossConfig):
        super().__init__()
        self.student, self.loss_cfg = student, loss

    def forward(self, batch: dict, teacher: TeacherPass, layout: TokenLayout) -> dict[str, torch.Tensor]:
        cfg = self.loss_cfg
        weights = token_weights(layout.valid, layout.is_vision(), cfg.vision_weight)
        out, student_hidden = run_student(self.student, batch)
        terms: dict[str, torch.Tensor] = {}
        total = out.logits.new_zeros((), dtype=torch.float32)
        if cfg.hidden:
            per_layer = [
                relative_mse(s, t, weights)
                for s, t in zip(student_hidden, teacher.layer_outputs, strict=True)
            ]
            terms["hidden"] = torch.stack(per_layer).mean()
            total = total + cfg.hidden * terms["hidden"]
        if cfg.kl:
            terms["kl"] = logit_kl(out.logits, teacher.logits, weights, cfg.temperature)
            total = total + cfg.kl * terms["kl"]
        if cfg.ce:
            text = layout.valid & ~layout.is_vision()
            terms["ce"] = next_token_ce(out.logits, batch["input_ids"], text.float())
            total = total + cfg.ce * terms["ce"]
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}
