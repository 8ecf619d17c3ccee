"""Gradient checkpointing for distillation: which parts of which decoder layers recompute in backward.

`stages.<stage>.gradient_checkpointing` is a policy (`true` is `"all"`, `false` is `"none"`):

- `all`: every decoder layer is recomputed in backward (least memory; the 7B recipes' setting so far).
- `every_other`: layers 0, 2, 4, ... are recomputed, the others keep their activations.
- `mlp_only`: only each layer's MLP (gate / up / down, with its LoRA adapters in stage 3) is recomputed; the
  M-MATE block keeps its activations, so its forward (scans, window attention) is never run twice.
- `none`: nothing is recomputed.
- `per_layer` (layer-wise stages only): nothing is recomputed and each layer's backward runs right after its
  forward (`objectives.LayerwiseObjective`), so one layer's activations are held at a time: `none`'s speed at
  less memory than `all`. One process or DDP (the trainer averages the gradients); not FSDP.

Recomputation repeats the same operations on the same inputs (and the same RNG state, for dropout), so the
loss and the gradients do not depend on the policy; only memory and time do. Every checkpointed call goes
through `checkpointed`, which `benchmarks/distill_throughput.py` times (`set_recompute_timer`) to split the
recomputation out of the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# the names of recipe.CHECKPOINT_POLICIES; recipe.policy_of turns a recipe value (a bool too) into one
Policy = Literal["all", "every_other", "mlp_only", "none", "per_layer"]

# benchmark hook: a callable returning a context manager that times one recomputation (None: no timing)
_timer: Callable[[], AbstractContextManager[Any]] | None = None
_in_backward = False


def layer_choice(policy: Policy, index: int) -> Literal["layer", "mlp", "none"]:
    """What decoder layer `index` recomputes under `policy`."""
    if policy == "all" or (policy == "every_other" and index % 2 == 0):
        return "layer"
    if policy == "mlp_only":
        return "mlp"
    return "none"


def set_recompute_timer(timer: Callable[[], AbstractContextManager[Any]] | None) -> None:
    """Benchmarks only: `timer()` wraps every recomputation that runs inside `backward_phase()`."""
    global _timer
    _timer = timer


class backward_phase:  # noqa: N801 (a context manager used like a function)
    """Marks a backward pass, so that the checkpointed functions called inside it count as recomputation."""

    def __enter__(self) -> None:
        global _in_backward
        _in_backward = True

    def __exit__(self, *exc: object) -> None:
        global _in_backward
        _in_backward = False


def _traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        span = _timer() if (_timer is not None and _in_backward) else nullcontext()
        with span:
            return fn(*args, **kwargs)

    return run


def checkpointed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` under non-reentrant activation checkpointing (RNG state preserved)."""
    return checkpoint(_traced(fn), *args, use_reentrant=False, **kwargs)


def _checkpointed_forward(module: nn.Module) -> Callable[..., Any]:
    forward = module.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return checkpointed(forward, *args, **kwargs)
        return forward(*args, **kwargs)

    return run


def checkpoint_mlp(layer: nn.Module) -> None:
    """Recompute `layer.mlp` in backward (an instance-level forward: parameter names stay as they are)."""
    layer.mlp.forward = _checkpointed_forward(layer.mlp)


def apply_end_to_end(model: nn.Module, layers: nn.ModuleList, policy: Policy) -> None:
    """Set an end-to-end (stage 3) student's checkpointing to `policy`, layer by layer.

    Whole layers use transformers' own mechanism (`GradientCheckpointingLayer`), with `checkpointed` as the
    function; MLPs use `checkpoint_mlp`.

    Enabling it also makes transformers hook every sub-model's input embeddings to require grad
    (`enable_input_require_grads`), the vision tower's patch embedding included: the frozen tower then sat in
    the autograd graph and ran its whole backward every step (at 7B shape, 64 frames: ~0.5 s of a 2.8 s step).
    Non-reentrant checkpointing does not need inputs that require grad, so the hooks are removed: the tower's
    output is a constant again, and the trainable parameters' gradients are unchanged (tested)."""
    if policy == "per_layer":
        raise ValueError("gradient_checkpointing per_layer is for layer-wise stages only")
    if policy == "none":
        return
    enable = getattr(
        model, "activation_checkpointing_enable", None
    )  # transformers >= 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    for i, layer in enumerate(layers):
        choice = layer_choice(policy, i)
        layer.gradient_checkpointing = choice == "layer"
        if choice == "layer":
            layer._gradient_checkpointing_func = checkpointed
        elif choice == "mlp":
            checkpoint_mlp(layer)
