"""Triton row kernels on what the end-to-end tests do not reach, checked against plain
fp64 computations or the torch row ops:

- the number of full passes each CKD variant makes over a row of logits, counted from
  the bytes the interpreter loads from the chunk (the table in ``_triton_ckd``);
- fp16 logits whose values differ only in the mantissa bits below a 16-bit fp32 key
  (the select must use all ten fp16 mantissa bits);
- -inf logits (a -inf bias on padded vocabulary): no NaN in loss, entropy or gradient.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from star_kernels import _backends, _torch_rows
from star_kernels._config import CKDConfig

pytestmark = pytest.mark.skipif(not _backends.triton_available(), reason="triton not installed")


@contextlib.contextmanager
def count_loads(buffer: torch.Tensor):
    """Count the elements of ``buffer`` that interpreted kernels load (masked-off lanes
    excluded). Yields a one-element list holding the count."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    if not hasattr(builder, "create_masked_load"):
        pytest.skip("this triton's interpreter has no create_masked_load to count loads")
    lo = buffer.data_ptr()
    hi = lo + buffer.numel() * buffer.element_size()
    count = [0]
    orig_masked, orig_load = builder.create_masked_load, builder.create_load

    def inside(addresses):
        a = np.asarray(addresses)
        return (a >= lo) & (a < hi)

    def masked_load(ptrs, mask, *args, **kwargs):
        count[0] += int(np.sum(inside(ptrs.data) & np.asarray(mask.data, dtype=bool)))
        return orig_masked(ptrs, mask, *args, **kwargs)

    def load(ptr, *args, **kwargs):
        count[0] += int(np.sum(inside(ptr.data)))
        return orig_load(ptr, *args, **kwargs)

    builder.create_masked_load, builder.create_load = masked_load, load
    try:
        yield count
    finally:
        builder.create_masked_load, builder.create_load = orig_masked, orig_load


def ckd_case(rows, vocab, k, dtype, seed=0, quantum=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    if quantum is not None:
        logits = (logits / quantum).round() * quantum
    teacher = torch.randn(rows, vocab, generator=g).mul(2).log_softmax(-1)
    lps, ids = teacher.topk(k, dim=-1)
    scale = torch.rand(rows, generator=g) + 0.5
    return logits.to(dtype), ids, lps, scale


@pytest.mark.parametrize("dtype,temperature,quantum,grad,want", [
    # 16-bit logits: two select passes at any temperature, plus the gradient pass.
    (torch.bfloat16, 1.0, None, True, {3}),
    (torch.bfloat16, 1.3, None, False, {2}),
    (torch.float16, 0.7, None, True, {3}),
    # fp32, continuous values: the select stops once the bin count lands on m,
    # typically at the third level; never more than 4 select passes + 1 gradient pass.
    (torch.float32, 1.0, None, True, {3, 4, 5}),
    # fp32 with many exact ties: every level runs, the last gives the mass: 4 + 1
    # (+ 1 to cut the ties at the m-th value, added by the test per row).
    (torch.float32, 1.0, 0.25, True, {5}),
    (torch.float32, 1.0, 0.25, False, {4}),
])
def test_ckd_row_passes(dtype, temperature, quantum, grad, want):
    from star_kernels import _triton_ckd

    rows, vocab, k = 3, 5000, 7  # several vocabulary blocks
    logits, ids, lps, scale = ckd_case(rows, vocab, k, dtype, quantum=quantum)
    cfg = CKDConfig(student_topm=20, temperature=temperature)
    losses, cuts = [], []
    for r in range(rows):  # one row per launch: each row's own pass count
        work = logits[r:r + 1].clone()
        with count_loads(work) as loaded:
            (loss,), _ = _triton_ckd.ckd_rows(work, ids[r:r + 1], lps[r:r + 1], None,
                                              scale[r:r + 1] if grad else None, cfg=cfg)
        losses.append(loss)
        gathers = k  # the teacher ids, gathered once (their gradient is not read back)
        passes = (loaded[0] - gathers) / vocab
        # Ties at the m-th value beyond m are cut by one more pass (|M| = m exactly)
        # and one more read of the block holding the cut (at most BLOCK_V logits).
        row = logits[r].float() / temperature
        cut = int((row >= row.topk(cfg.student_topm).values[-1]).sum() > cfg.student_topm)
        block = _triton_ckd.BLOCK_V / vocab
        assert any(w + cut <= passes <= w + cut * (1 + block) for w in want), (r, passes, cut)
        cuts.append(cut)
    if quantum is not None:
        assert all(cuts)  # the tie pass is exercised
    loss = torch.cat(losses)
    (want_loss,), _ = _torch_rows.ckd_rows(logits.clone(), ids, lps, None, None, cfg=cfg)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(loss, want_loss, rtol=tol, atol=tol)


def test_roofline_model_uses_these_pass_counts():
    """benchmarks/roofline.py predicts the row kernel's traffic from its pass table:
    16-bit logits with gradient read 3 times (test above), fp32 at most 5 times."""
    from benchmarks import roofline

    assert roofline.ROW_PASSES["row3"]["ckd"] == {"16-bit": (3, 1), "fp32": (5, 1)}


def test_ckd_fp16_uses_every_mantissa_bit():
    """fp16 values in [4, 8) agree on the top 16 bits of their fp32 key in groups of
    eight: a select that stops there counts whole groups into the top m."""
    from star_kernels import _triton_ckd

    g = torch.Generator().manual_seed(0)
    logits = (4 + 4 * torch.rand(3, 3000, generator=g)).half()
    ids = torch.randperm(3000, generator=g)[:5].repeat(3, 1)
    lps = torch.full((3, 5), -3.0)
    scale = torch.ones(3)
    cfg = CKDConfig(student_topm=37)
    (want,), want_g = _torch_rows.ckd_rows(logits.clone(), ids, lps, None, scale, cfg=cfg)
    (got,), got_g = _triton_ckd.ckd_rows(logits.clone(), ids, lps, None, scale, cfg=cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_g.float(), want_g.float(), rtol=2e-3, atol=1e-5)


def padded_logits(rows, vocab, pad, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2
    logits[:, vocab - pad:] = float("-inf")   # a -inf bias on padded vocabulary
    logits[0, :3] = float("-inf")             # and a few inside a block
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_entropy_with_minus_inf_logits(dtype):
    from star_kernels import _triton_logprobs

    rows, vocab, pad = 4, 5000, 904
    logits = padded_logits(rows, vocab, pad, dtype)
    ids = torch.tensor([5, 17, 4000, 3])
    g_lp = torch.tensor([1.0, -0.5, 0.25, 2.0])
    g_ent = torch.tensor([0.3, 1.0, -1.0, 0.5])
    # Independent fp64 reference on the finite part of the row.
    x = logits.double().requires_grad_(True)
    logq = torch.log_softmax(x, -1)
    q = logq.exp()
    want_lp = logq.gather(1, ids[:, None])[:, 0]
    want_ent = -(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum(-1)
    (gx,) = torch.autograd.grad((want_lp * g_lp).sum() + (want_ent * g_ent).sum(), x)
    work = logits.clone()
    lp, ent, grad = _triton_logprobs.logprob_rows(work, ids, 1.0, True, g_lp, g_ent)
    assert torch.isfinite(ent).all() and torch.isfinite(grad.float()).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), gx, rtol=tol, atol=tol * 1e-2)
    assert (grad[:, vocab - pad:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ckd_with_minus_inf_logits(dtype):
    from star_kernels import _triton_ckd

    rows, vocab, pad, k = 3, 5000, 904, 9
    logits = padded_logits(rows, vocab, pad, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(rows, vocab - pad, generator=g).log_softmax(-1)
    lps, ids = teacher.topk(k, dim=-1)
    ids[0] += 3  # keep row 0's teacher ids off its -inf logits
    scale = torch.ones(rows)
    cfg = CKDConfig(student_topm=25, kd_ratio=0.5, tail_bucket=True)
    labels = torch.tensor([10, 20, 30])
    (want,), want_g = _torch_rows.ckd_rows(logits.clone(), ids, lps, labels, scale, cfg=cfg)
    (got,), got_g = _triton_ckd.ckd_rows(logits.clone(), ids, lps, labels, scale, cfg=cfg)
    assert torch.isfinite(got).all() and torch.isfinite(got_g.float()).all()
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # as in test_triton_ckd_rows
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_g.float(), want_g.float(), rtol=tol, atol=tol * 1e-2)
    assert (got_g[:, vocab - pad:] == 0).all()
