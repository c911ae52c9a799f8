"""What a result's autograd graph says about how it was computed."""

from __future__ import annotations

import torch


def kernel_ran(y: torch.Tensor) -> bool:
    """Whether the autograd graph of ``y`` has a ``normlab::`` custom op's node."""
    todo, seen = [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "normlab" in type(node).__name__:
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False
