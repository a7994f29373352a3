"""The Triton CKD row kernel against the torch row op on hand-made logits chunks.

These reach what the end-to-end tests cannot at small vocabularies: rows spanning
several vocabulary blocks, heavy ties at the top-m threshold (every radix level
runs), and 16-bit logits read and written in place.
"""

import pytest
import torch

from star_kernels import _backends, _torch_rows
from star_kernels._config import CKDConfig

pytestmark = pytest.mark.skipif(not _backends.triton_available(), reason="triton not installed")


def rows_case(rows, vocab, k, dtype, quantum=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    if quantum is not None:  # many exact ties, at the threshold too
        logits = (logits / quantum).round() * quantum
    teacher = torch.randn(rows, vocab, generator=g).mul(2).log_softmax(-1)
    lps, ids = teacher.topk(k, dim=-1)
    lps[0, k // 2:] = float("-inf")
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[1] = -100
    scale = torch.rand(rows, generator=g) + 0.5
    return logits.to(dtype), ids, lps, labels, scale


@pytest.mark.parametrize("vocab,quantum,dtype", [
    (5003, None, torch.float32),    # several blocks, continuous values
    (4099, 0.25, torch.float32),    # ties at the threshold: every radix level runs
    (3001, None, torch.bfloat16),   # 16-bit logits, gradient written back in bf16
    (2500, 0.5, torch.float16),
])
@pytest.mark.parametrize("knobs", [
    dict(student_topm=37),
    dict(student_topm=1, kd_ratio=0.4, tail_bucket=True, temperature=1.3),
])
def test_triton_rows_match_torch_rows(vocab, quantum, dtype, knobs):
    from star_kernels import _triton_ckd

    cfg = CKDConfig(**knobs)
    logits, ids, lps, labels, scale = rows_case(6, vocab, 23, dtype, quantum)
    lab = labels if cfg.kd_ratio < 1 else None
    (want,), want_g = _torch_rows.ckd_rows(logits.clone(), ids, lps, lab, scale, cfg=cfg)
    (got,), got_g = _triton_ckd.ckd_rows(logits.clone(), ids, lps, lab, scale, cfg=cfg)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got_g.dtype == dtype
    torch.testing.assert_close(got_g.float(), want_g.float(), rtol=tol, atol=tol * 1e-2)
    (no_grad,), none = _triton_ckd.ckd_rows(logits.clone(), ids, lps, lab, None, cfg=cfg)
    assert none is None
    torch.testing.assert_close(no_grad, got)


def test_ties_admit_exactly_m_lowest_ids():
    from star_kernels import _triton_ckd

    # Row of 3000 logits where 10 share the maximum: top-3 is ids 100, 101, 102.
    logits = torch.zeros(1, 3000)
    logits[0, 100:110] = 5.0
    ids = torch.tensor([[100]])
    lps = torch.tensor([[-0.1]])
    cfg = CKDConfig(student_topm=3, tail_coef=1.0)
    (loss,), _ = _triton_ckd.ckd_rows(logits.clone(), ids, lps, None, None, cfg=cfg)
    q = torch.softmax(logits[0].double(), 0)
    fkl = torch.tensor(-0.1).exp() * (-0.1 - q[100].log())
    mistakes = q[101:103].sum()
    torch.testing.assert_close(loss.double(), (fkl + mistakes)[None], rtol=1e-5, atol=1e-6)
