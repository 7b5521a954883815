"""The reference statistics of normalization layers: their inputs captured by hooks, then ``torch.var_mean``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_reg.functional.bn_recalibration import tracking_norm_layers


def norm_input_statistics(model: nn.Module, batches: list[Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and unbiased variance per channel of each norm layer's inputs, concatenated over all batches.

    The inputs are captured by hooks in the regime "norm layers in training mode, everything else in eval", the
    pass ``recalibrate_bn`` makes; the statistics are computed here independently with ``torch.var_mean``. The
    hooks run after each call, so only the calls torch itself runs count: a call with one value per channel raises
    torch's own "Expected more than 1 value per channel" and ends that forward, the calls before it count.
    """
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list[Tensor]] = {}
    for name, layer in tracking_norm_layers(ref):
        layer.train()
        layer.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].clone()))
    with torch.no_grad():
        for x in batches:
            try:
                ref(x)
            except ValueError as error:  # torch refuses one value per channel in training mode
                if "more than 1 value per channel" not in str(error):
                    raise
    out = {}
    for name, xs in seen.items():
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1).double()  # (C, all)
        var, mean = torch.var_mean(flat, dim=1)
        out[name] = (mean, var)
    return out
