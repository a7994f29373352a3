"""CUDA-only checks (marked ``gpu``; skipped without a GPU, which is not a pass)."""

import pytest
import torch

import star_kernels as sk
from ckd_cases import make_problem
from star_kernels import reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
def test_ckd_triton_matches_reference_on_cuda(dtype, tol):
    p = make_problem(301, 64, 5003, 37, bias=True, pad_rows=(3,))
    dev = "cuda"
    h = p["hidden"].to(dev, dtype).requires_grad_()
    w = p["weight"].to(dev, dtype).requires_grad_()
    ids, lps, mask = p["ids"].to(dev), p["logprobs"].float().to(dev), p["mask"].to(dev)
    out = sk.fused_linear_ckd_loss(h, w, ids, lps, mask=mask, student_topm=41, backend="triton")
    out.backward()
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    exp = reference.fused_linear_ckd_loss(h64, w64, ids, lps.double(), mask=mask, student_topm=41)
    exp.backward()
    torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert ((got.double() - want).norm() / want.norm()) < tol


def test_ckd_triton_transient_memory_is_bounded():
    n, hdim, vocab, k = 4096, 1024, 151936, 100
    dev = "cuda"
    h = torch.randn(n, hdim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hdim, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    lps, ids = torch.randn(n, vocab // 64, device=dev).log_softmax(-1).topk(k, dim=-1)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sk.fused_linear_ckd_loss(h, w, ids, lps, backend="triton").backward()
    torch.cuda.synchronize()
    grads = h.numel() * 2 + w.numel() * (2 + 4)  # grad_hidden, grad_weight (+ fp32 accumulator)
    transient = torch.cuda.max_memory_allocated() - base - grads
    assert transient < 1.1 * (1 << 30), transient
