"""What a distillation step optimizes, as nn.Modules so DDP / FSDP can wrap them.

- `LayerwiseObjective` (stages 1-2): every student decoder layer gets the teacher's input to that layer
  (detached) and regresses the teacher's output of that layer; one teacher pass feeds all layers.
- `EndToEndObjective` (stage 3): the student runs the whole model; per-layer hidden-state regression plus
  token-level logit KL (and optional CE) against the teacher.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from linmu_cli.distillation.losses import logit_kl, next_token_ce, relative_mse, token_weights
from linmu_cli.distillation.recipe import LossConfig, policy_of
from linmu_cli.distillation.recompute import Policy, checkpoint_mlp, checkpointed, layer_choice
from linmu_cli.errors import LinmuError
from linmu_cli.layers.layout import TokenLayout


@dataclass
class TeacherPass:
    """What one frozen teacher forward provides to the student objectives.

    `layer_outputs[k]` is the output of decoder layer `layer_ids[k]`; `layer_inputs` is empty when the
    objective does not need it (end to end: the student computes its own inputs)."""

    layer_inputs: list[torch.Tensor]  # hidden state entering each decoder layer
    layer_outputs: list[torch.Tensor]  # hidden state leaving each kept decoder layer
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    logits: torch.Tensor | None
    layer_ids: list[int] = field(default_factory=list)  # which layers layer_outputs holds ([] = all)
    inputs_embeds: torch.Tensor | None = (
        None  # what entered layer 0: token embeddings with the vision features
    )

    def output_of(self, index: int) -> torch.Tensor:
        return self.layer_outputs[self.layer_ids.index(index) if self.layer_ids else index]


@torch.no_grad()
def run_teacher(
    teacher: nn.Module,
    layers: nn.ModuleList,
    batch: dict,
    want_logits: bool,
    *,
    keep_inputs: bool = True,
    keep_layers: Sequence[int] | None = None,
    keep_embeds: bool = False,
) -> TeacherPass:
    """One teacher forward, recording decoder layers' inputs, outputs and the rotary embeddings via hooks.

    `keep_inputs=False` keeps no layer inputs, `keep_layers` the outputs of those layers only (None: all),
    `keep_embeds` layer 0's input as `inputs_embeds` (for `EndToEndObjective(share_embeddings=True)`);
    without `want_logits` the LM head runs on the last token only (`logits_to_keep=1`; no logits are kept).
    The kept tensors are the teacher's own (its dtype: bfloat16 on GPU), detached, never copied."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    rope: list = []
    embeds: list[torch.Tensor] = []
    kept = set(range(len(layers)) if keep_layers is None else keep_layers)
    ids = sorted(kept)

    def pre(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).detach()
        if keep_inputs:
            inputs.append(hidden)
        if not rope:
            rope.append(kwargs.get("position_embeddings"))
            embeds.append(hidden)

    def post(index, module, args, kwargs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    handles += [
        layer.register_forward_hook(functools.partial(post, i), with_kwargs=True)
        for i, layer in enumerate(layers)
        if i in kept
    ]
    extra = {} if want_logits else {"logits_to_keep": 1}
    try:
        out = teacher(**batch, use_cache=False, **extra)
    finally:
        for h in handles:
            h.remove()
    return TeacherPass(
        inputs,
        outputs,
        rope[0] if rope else None,
        out.logits if want_logits else None,
        [] if keep_layers is None else ids,
        embeds[0] if keep_embeds and embeds else None,
    )


def run_student(
    student: nn.Module, batch: dict, keep_layers: Sequence[int] | None = None
) -> tuple[Any, list[torch.Tensor]]:
    """Student forward (with grad when enabled) returning (output, the kept decoder layers' outputs)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    layers = student.family.decoder_layers(student)
    kept = set(range(len(layers)) if keep_layers is None else keep_layers)
    handles = [layer.register_forward_hook(hook) for i, layer in enumerate(layers) if i in kept]
    try:
        out = student(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out, captured


def layer_backward(loss: torch.Tensor, grad: torch.Tensor) -> None:
    """One layer's backward inside `LayerwiseObjective.forward` (`per_layer`); a function of its own so the
    benchmark can time it."""
    loss.backward(grad)


class LayerwiseObjective(nn.Module):
    """Stages 1-2. `checkpointing` is a policy (recompute.py; a bool is `all` / `none`).

    `per_layer`: the layers are independent (each starts from the teacher's detached input), so each one's
    backward runs right after its forward, with the gradient the trainer's `(loss / grad_accum).backward()`
    would give it: the same gradients bit for bit, nothing recomputed, one layer's activations held at a time.
    The returned loss is then detached (`runs_backward`): the caller must not call backward on it."""

    def __init__(
        self,
        student: nn.Module,
        loss: LossConfig,
        checkpointing: bool | Policy = False,
        grad_accum: int = 1,
    ):
        super().__init__()
        self.student, self.loss_cfg = student, loss
        self.policy = policy_of(checkpointing)
        self.checkpointing = self.policy not in ("none", "per_layer")
        self.runs_backward = self.policy == "per_layer"
        self.grad_accum = grad_accum
        layers = self.student.family.decoder_layers(self.student)
        self.choices = [layer_choice(self.policy, i) for i in range(len(layers))]
        for layer, choice in zip(layers, self.choices, strict=True):
            if choice == "mlp":
                checkpoint_mlp(layer)

    def forward(self, teacher: TeacherPass, layout: TokenLayout) -> dict[str, torch.Tensor]:
        weights = token_weights(layout.valid, layout.is_vision(), self.loss_cfg.vision_weight)
        layers = self.student.family.decoder_layers(self.student)
        # per_layer: d(loss / grad_accum) / d(layer k's term), in the order autograd computes it (the trainer's
        # division, the loss weight, the mean over layers), so that the gradients are the same bits
        grad = None
        if self.runs_backward and torch.is_grad_enabled():
            one = torch.ones((), dtype=torch.float32, device=weights.device)
            grad = one / self.grad_accum * self.loss_cfg.hidden / len(layers)
        per_layer = []
        for layer, choice, h_in, h_out in zip(
            layers, self.choices, teacher.layer_inputs, teacher.layer_outputs, strict=True
        ):
            call = lambda h, layer=layer: layer(  # noqa: E731
                h, attention_mask=None, position_embeddings=teacher.position_embeddings, linmu_layout=layout
            )
            out = checkpointed(call, h_in) if choice == "layer" else call(h_in)
            out = out[0] if isinstance(out, tuple) else out
            term = relative_mse(out, h_out, weights)
            if grad is not None and term.requires_grad:
                layer_backward(term, grad)
                term = term.detach()
            per_layer.append(term)
        hidden = torch.stack(per_layer).mean()
        return {"loss": self.loss_cfg.hidden * hidden, "hidden": hidden.detach()}


def hidden_layer_ids(cfg: LossConfig, n_layers: int) -> list[int]:
    """The decoder layers whose hidden states an end-to-end loss regresses (none when `hidden` is 0)."""
    if not cfg.hidden:
        return []
    ids = list(range(n_layers)) if cfg.hidden_layers is None else sorted(set(cfg.hidden_layers))
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise LinmuError(f"loss.hidden_layers {bad}: the student has decoder layers 0..{n_layers - 1}")
    return ids


# what the student's own embedding and vision tower read; with shared embeddings they do not run
PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")


class EndToEndObjective(nn.Module):
    """Stage 3. `share_embeddings`: the student starts from the teacher's layer-0 input (token embeddings with
    the vision tower's features in place; frozen and shared, so the same tensor the student would compute, up
    to autocast's rounding on GPU) instead of running the vision tower a second time; needs a teacher pass
    made with `keep_embeds=True`."""

    runs_backward = False  # the caller runs the backward (`LayerwiseObjective` may run its own)

    def __init__(self, student: nn.Module, loss: LossConfig, share_embeddings: bool = False):
        super().__init__()
        self.student, self.loss_cfg, self.share_embeddings = student, loss, share_embeddings
        # the layers the hidden loss regresses (checked once, here): what the teacher pass needs to keep
        self.hidden_ids = hidden_layer_ids(loss, len(student.family.decoder_layers(student)))

    def forward(self, batch: dict, teacher: TeacherPass, layout: TokenLayout) -> dict[str, torch.Tensor]:
        cfg, ids = self.loss_cfg, self.hidden_ids
        weights = token_weights(layout.valid, layout.is_vision(), cfg.vision_weight)
        inputs = batch
        if self.share_embeddings:
            if teacher.inputs_embeds is None:
                raise ValueError("share_embeddings needs a teacher pass made with keep_embeds=True")
            inputs = {k: v for k, v in batch.items() if k not in PIXEL_INPUTS}
            inputs["inputs_embeds"] = teacher.inputs_embeds
        out, student_hidden = run_student(self.student, inputs, ids)
        terms: dict[str, torch.Tensor] = {}
        total = out.logits.new_zeros((), dtype=torch.float32)
        if cfg.hidden:
            per_layer = [
                relative_mse(s, teacher.output_of(i), weights)
                for s, i in zip(student_hidden, ids, strict=True)
            ]
            terms["hidden"] = torch.stack(per_layer).mean()
            total = total + cfg.hidden * terms["hidden"]
        if cfg.kl:
            terms["kl"] = logit_kl(out.logits, teacher.logits, weights, cfg.temperature, cfg.kl_backend)
            total = total + cfg.kl * terms["kl"]
        if cfg.ce:
            text = layout.valid & ~layout.is_vision()
            terms["ce"] = next_token_ce(out.logits, batch["input_ids"], text.float())
            total = total + cfg.ce * terms["ce"]
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}
