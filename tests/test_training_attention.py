"""`onpolicy.training_attention`: short CPU bf16 training forwards run SDPA's math backend, the rest torch's choice."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.onpolicy import MATH_ATTENTION_MAX_POSITIONS, training_attention

FLASH = "aten._scaled_dot_product_flash_attention_for_cpu"


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _attention(positions: int, cpu_bf16: bool):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, positions, 16, requires_grad=True) for _ in range(3))
    with training_attention(positions, cpu_bf16), torch.autocast("cpu", dtype=torch.bfloat16), _OpLog() as log:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.float().sum().backward()
    return log.ops, out.float(), q.grad


def test_short_cpu_bf16_forwards_take_the_math_backend_with_the_same_values():
    short = MATH_ATTENTION_MAX_POSITIONS // 2
    ops, out, grad = _attention(short, cpu_bf16=True)
    assert FLASH not in ops
    flash_ops, flash_out, flash_grad = _attention(short, cpu_bf16=False)
    assert FLASH in flash_ops  # torch's own choice here: the flash kernel (else this test tests nothing)
    torch.testing.assert_close(out, flash_out, rtol=2e-2, atol=2e-2)  # bf16 rounding
    torch.testing.assert_close(grad, flash_grad, rtol=5e-2, atol=5e-2)


def test_long_forwards_keep_torchs_choice():
    ops, _, _ = _attention(MATH_ATTENTION_MAX_POSITIONS + 1, cpu_bf16=True)
    assert FLASH in ops
