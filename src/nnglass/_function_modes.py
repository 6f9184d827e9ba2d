"""A TorchFunctionMode that is put on and taken off this thread's torch function stack by
hand, not with `with`: the tracer's recording mode and the runtime's `.source` modes
come and go at times a `with` block cannot follow (a module's hooks, a trace's block).

Invariant: `pop` takes off this mode only; modes pushed after it (a user's, another
module's) stay on the stack, in their order.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class StackedMode(TorchFunctionMode):
    def push(self) -> None:
        torch._C._push_on_torch_function_stack(self)

    def pop(self) -> None:
        n = torch._C._len_torch_function_stack()
        if n and torch._C._get_function_stack_at(n - 1) is self:
            torch._C._pop_torch_function_stack()
            return
        stack = [torch._C._pop_torch_function_stack() for _ in range(n)]
        for m in reversed(stack):
            if m is not self:
                torch._C._push_on_torch_function_stack(m)
