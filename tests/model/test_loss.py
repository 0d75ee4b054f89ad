"""The fused output projection + cross entropy (``omnitrain.model.loss.linear_cross_entropy``): chunks sized from a
byte budget, fp32 as exact as the unchunked logits, and bf16 matmuls within bf16's precision of fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from omnitrain.model.loss import CHUNK_BYTES, chunk_rows, linear_cross_entropy

N, D, V = 96, 32, 1000
Z_LOSS = 1e-3


class Calls(TorchFunctionMode):
    """Records log_softmax calls (one per chunk) and the dtypes of the matmuls' operands."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks, self.matmul_dtypes = 0, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.log_softmax:
            self.chunks += 1
        if getattr(func, "__name__", "") in ("__matmul__", "matmul", "mm", "addmm_"):
            self.matmul_dtypes |= {a.dtype for a in args if torch.is_tensor(a) and a.ndim == 2}
        return func(*args, **(kwargs or {}))


def inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h, weight = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:5] = -100  # ignored
    w = torch.rand(N, generator=g)
    return h, weight, targets, w


def reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, denom: float) -> torch.Tensor:
    """The unchunked loss: every [N, V] logit at once, F.cross_entropy, fp32."""
    logits = h.float() @ weight.float().t()  # [N, V]
    w = w * (targets >= 0)
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    return ((ce * w).sum() + Z_LOSS * (torch.logsumexp(logits, -1).square() * w).sum()) / denom


def loss_and_grads(h, weight, targets, w, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    h, weight = h.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = linear_cross_entropy(h, weight, targets, w, Z_LOSS, 40.0, **kw)[0]
    (loss * 2.0).backward()  # an incoming gradient other than 1
    return loss.detach().float(), h.grad.float(), weight.grad.float()


def test_chunk_rows_come_from_the_byte_budget():
    assert CHUNK_BYTES["cuda"] == 256 << 20
    assert chunk_rows(8192, 65536, "cuda") == 1024  # 256 MiB of fp32 logits at V = 64k: 8 chunks, not 64 of 128 rows
    assert chunk_rows(8192, 8704, "cpu") == 911  # 32 MiB on CPU: 963 rows fit, evened out to 9 chunks of 911
    assert chunk_rows(512, 8704, "cpu") == 512  # never more rows than there are
    assert chunk_rows(512, 1000, "cpu", chunk_bytes=4 * 1000 * 200) == 171  # 200 rows fit: 3 equal chunks, not 200+200+112
    assert chunk_rows(10, 10**6, "cpu", chunk_bytes=1) == 1  # a budget below one row still makes progress


@pytest.mark.parametrize("budget_rows,chunks", [(N, 1), (40, 3), (7, 14)])
def test_the_loss_runs_as_many_chunks_as_the_budget_allows(budget_rows, chunks):
    h, weight, targets, w = inputs()
    with Calls() as calls:
        linear_cross_entropy(h, weight, targets, w, Z_LOSS, 40.0, chunk_bytes=4 * V * budget_rows)
    assert calls.chunks == chunks


@pytest.mark.parametrize("budget_rows", [N, 40, 7])
def test_fp32_equals_the_unchunked_logits_in_every_chunking(budget_rows):
    h, weight, targets, w = inputs()
    with Calls() as calls:
        got = loss_and_grads(h, weight, targets, w, chunk_bytes=4 * V * budget_rows)
    assert calls.matmul_dtypes == {torch.float32}
    hr, wr = h.clone().requires_grad_(), weight.clone().requires_grad_()
    (reference(hr, wr, targets, w, 40.0) * 2.0).backward()
    for a, b in zip(got, (reference(h, weight, targets, w, 40.0), hr.grad, wr.grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# bf16 rounds to 8 significant bits (unit roundoff 2^-9 = 2e-3): the gradients carry about one rounding (measured
# 1.6e-3 to 2.7e-3 relative in norm); the loss averages the per-token errors down (measured 7e-5). Limits ~4x and ~14x
# that: an fp32 reference within them, a wrong formula (or a bf16 sum over chunks) far outside.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 1e-3, 1e-2


def close_in_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["bf16-true", "bf16-mixed"])
def test_bf16_matmuls_give_the_fp32_loss_and_gradients_within_bf16_precision(mode):
    h, weight, targets, w = inputs(1)
    want = loss_and_grads(h, weight, targets, w, chunk_bytes=4 * V * 40)
    with Calls() as calls:
        if mode == "bf16-true":  # bf16 parameters and activations
            got = loss_and_grads(h.bfloat16(), weight.bfloat16(), targets, w, chunk_bytes=4 * V * 40)
        else:  # fp32 parameters, autocast: the matmuls in bf16, the rest fp32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = loss_and_grads(h, weight, targets, w, chunk_bytes=4 * V * 40)
    assert calls.matmul_dtypes == {torch.bfloat16}  # every matmul in bf16, none in fp32
    assert got[0] == pytest.approx(float(want[0]), rel=BF16_LOSS_RTOL)
    assert close_in_norm(got[1], want[1]) < BF16_GRAD_RTOL and close_in_norm(got[2], want[2]) < BF16_GRAD_RTOL
