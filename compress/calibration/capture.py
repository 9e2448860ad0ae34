"""Capture what the model feeds its first decoder block: the hidden states and EVERY other argument.

Keyword arguments (position embeddings, masks, cache positions) change across transformers versions, so
they are kept opaquely and replayed as they are, never picked by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BlockInputs:
    """Inputs of a decoder block: ``hidden`` ``(nsamples, seqlen, hidden)`` plus opaque extra args/kwargs."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


class _Captured(Exception):
    pass


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor) -> BlockInputs:
    """Run ``model`` on ``input_ids`` until it reaches ``first_block`` and return that block's inputs."""
    seen: dict = {}

    def hook(_module, args, kwargs):
        if args:
            seen["hidden"], seen["args"] = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            seen["hidden"], seen["args"] = kwargs.pop("hidden_states"), ()
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError("the model never called its first decoder block")
    kwargs = dict(seen["kwargs"])
    kwargs.pop("past_key_value", None)
    kwargs.pop("past_key_values", None)
    return BlockInputs(seen["hidden"], seen["args"], kwargs)
