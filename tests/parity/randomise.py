"""Moves a reference model's norms and biases off their ones/zeros init before a parity test, so
that a wrong formula or a mis-mapped (or swapped) weight cannot hide behind them."""

import torch


def randomise(model: torch.nn.Module, *names: str, mean: float = 0.0, std: float = 0.3) -> None:
    """N(mean, std) into every parameter whose name holds one of `names`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.normal_(mean, std)
