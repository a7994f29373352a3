"""The fused CKD loss trains an FSDP2-sharded model (``fully_shard``, gloo, 2 processes)
exactly as it trains the unsharded model in one process.

Outside its forward, a ``fully_shard`` model's ``lm_head.weight`` is a ``DTensor`` shard.
The supported path is the patched forward (:mod:`star_kernels.patching`): the fused loss
runs inside the root module's forward, where FSDP2 has unsharded the root's parameters,
and an lm_head that is its own ``fully_shard`` unit (whose forward never runs) is gathered
by :func:`star_kernels.hf.gathered`, its gradient reduce-scattered back to the shards.

Three layouts of a tiny Qwen3: the head in the root unit (untied), tied to the embedding,
and the head as its own unit. Each rank takes half of a 4-sequence batch; one SGD step;
the weights after the step equal the one-process step on the whole batch.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from hf_models import VOCAB, batch, tiny
from star_kernels import hf, patching
from test_vocab_parallel import TIMEOUT_S, run_ranks

WORLD, LR = 2, 0.5
LAYOUTS = ("head_in_root", "tied", "head_unit")
CKD = dict(student_topm=20, tail_coef=5.0, backend="torch")


def data() -> dict:
    """A 4-sequence batch (row 1 right-padded) with a teacher top-k in the helpers' layout."""
    b = batch(seed=0, batch_size=4, seq_len=11)
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(4, 10, VOCAB, generator=g).mul(2).log_softmax(-1)
    b["teacher_logprobs"], b["teacher_ids"] = teacher.topk(5, dim=-1)
    return b


def counted(b) -> int:
    """Predictions that count in the loss (the patched forward's mask)."""
    return int(hf._target_mask(b["loss_mask"], b["attention_mask"], b["input_ids"]).sum())


def model_for(layout: str):
    model = tiny("qwen3", tie=layout == "tied")
    return patching.patch_model(model)


def sgd_step(model, b, num_items) -> torch.Tensor:
    """One SGD step on the fused CKD loss through the patched forward: the loss is the sum
    over counted tokens divided by ``num_items`` (what a Trainer passes)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = model(b["input_ids"], b["attention_mask"], teacher_ids=b["teacher_ids"],
                teacher_logprobs=b["teacher_logprobs"], loss_mask=b["loss_mask"],
                num_items_in_batch=num_items, ckd_kwargs=CKD)
    assert out.logits is None
    out.loss.backward()
    opt.step()
    return out.loss.detach()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, store: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    try:
        results = {}
        b = data()
        mine = {k: v[2 * rank:2 * rank + 2] for k, v in b.items()}
        for layout in LAYOUTS:
            model = model_for(layout)
            for layer in model.model.layers:
                fully_shard(layer)
            if layout == "head_unit":
                fully_shard(model.lm_head)
            fully_shard(model)
            sharded = isinstance(model.lm_head.weight, DTensor)
            # FSDP2 averages gradients over the ranks: dividing each rank's token sum by
            # the global count over the world size makes that average the global mean's.
            loss = sgd_step(model, mine, counted(b) / world)
            with torch.no_grad():
                logp = model(mine["input_ids"], mine["attention_mask"],
                             fused_logprobs=True).log_probs
                params = {n: _full(p.detach()) for n, p in model.named_parameters()}
            try:  # the helpers called outside the forward (parameters unsharded after the
                # no-grad forward, but no FSDP hooks): refused, pointing at patching
                hf.ckd_loss_from_model(model, mine["input_ids"], mine["attention_mask"],
                                       mine["teacher_ids"], mine["teacher_logprobs"])
                outside = None
            except RuntimeError as err:
                outside = str(err)
            results[layout] = dict(sharded=sharded, loss=loss, logp=logp, params=params,
                                   outside=outside)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # What each rank would otherwise import on first use, once in the fork server.
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp"),
                     preload=["torch.distributed.fsdp", "torch.distributed.tensor",
                              "transformers.models.qwen3.modeling_qwen3"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_step_equals_one_process(ranks, layout):
    b = data()
    model = model_for(layout)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = sgd_step(model, b, counted(b))
    with torch.no_grad():
        logp = model(b["input_ids"], b["attention_mask"], fused_logprobs=True).log_probs

    res = [r[layout] for r in ranks]
    assert all(r["sharded"] for r in res), "lm_head.weight is a DTensor outside the forward"
    assert all("star_kernels.patching" in (r["outside"] or "") for r in res), res[0]["outside"]
    # Each rank's loss is its token sum over half the global count: their mean is the loss.
    torch.testing.assert_close(sum(r["loss"] for r in res) / WORLD, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["logp"] for r in res]), logp, rtol=1e-5, atol=1e-5)
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-2, "the step changes the weights (the comparison is not vacuous)"
    for r in res:
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"{layout}: {name} after the step")
