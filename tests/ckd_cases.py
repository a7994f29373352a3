"""Random CKD problems shared by the CKD tests."""

import torch


def make_problem(n, h, v, k, dtype=torch.float64, seed=0, batch=None, pad_rows=(),
                 bias=False):
    """Student hidden/weight, a teacher top-k (full-vocab normalised), a mask, labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 2
    teacher = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    logprobs, ids = teacher.topk(k, dim=-1)
    for r in pad_rows:  # padding entries: -inf log-prob, an arbitrary id
        logprobs[r, k // 2:] = float("-inf")
        ids[r, k // 2:] = 0
    mask = torch.rand(n, generator=g) > 0.25
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    out = dict(hidden=hidden, weight=weight, ids=ids, logprobs=logprobs, mask=mask,
               labels=labels, bias=b)
    if batch is not None:
        for key in ("hidden", "ids", "logprobs", "mask", "labels"):
            out[key] = out[key].reshape(batch, n // batch, *out[key].shape[1:])
    return {key: (t.to(dtype) if t is not None and t.is_floating_point()
                  and key in ("hidden", "weight", "bias") else t)
            for key, t in out.items()}
