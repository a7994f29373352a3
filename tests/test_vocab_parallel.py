"""Vocab-parallel fused ops on 2 and 3 gloo processes equal the single-process op and the
fp64 full-logits reference: the CKD loss, log-probs and entropies, the GRPO loss and its
diagnostics, and the gradients of the hidden states and of the full weight (the ranks'
slices concatenated), to ~1e-10.

V = 1000 does not divide by 3 (slices of 334, 333, 333 rows), H = 7, N = 21. One spawn
per world size runs every case; the parent compares. The "tied" problem has small
integer hidden states and weights, so its logits are exact integers in fp64 whatever the
GEMM's blocking, and each row ties many ids at the student's m-th value; the test checks
that the kept and dropped tied ids straddle rank boundaries.
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import star_kernels as sk
from star_kernels import reference
from star_kernels.vocab_parallel import vocab_shard_range

VOCAB, HIDDEN, SHAPE, K = 1000, 7, (3, 7), 6
TIMEOUT_S = 120

# Enough rows per chunk for 3 rows at the widest slice (fp64 CKD: 17 bytes per logit), so
# every case with it runs several chunks, of sizes that differ from the single-process op's.
SMALL_BUDGET = 3 * 500 * 17

CASES = {
    "fkl_mask": dict(op="ckd", problem="random", knobs=dict(student_topm=37), mask=True),
    "rkl_bias_sum_t07": dict(op="ckd", problem="random", bias=True,
                             knobs=dict(kd_type="rkl", temperature=0.7, reduction="sum",
                                        tail_coef=3.0, student_topm=50)),
    "akl_none_chunks": dict(op="ckd", problem="random", mask=True,
                            knobs=dict(kd_type="akl", reduction="none", student_topm=20,
                                       memory_budget=SMALL_BUDGET)),
    "ce_mix_tail_bucket": dict(op="ckd", problem="random", mask=True, labels=True,
                               knobs=dict(kd_ratio=0.6, tail_bucket=True, student_topm=10)),
    "topm_wider_than_slice": dict(op="ckd", problem="random", knobs=dict(student_topm=400)),
    "tied_fkl": dict(op="ckd", problem="tied", mask=True,
                     knobs=dict(student_topm=37, memory_budget=SMALL_BUDGET)),
    "tied_akl_none": dict(op="ckd", problem="tied", bias=True,
                          knobs=dict(kd_type="akl", student_topm=90, reduction="none")),
    "logprobs_entropy_bias": dict(op="logprobs", problem="random", bias=True,
                                  knobs=dict(temperature=0.8, return_entropy=True)),
    "logprobs_chunks": dict(op="logprobs", problem="tied",
                            knobs=dict(memory_budget=3 * 500 * 16)),
    # Other dtypes, on integer logits (exact in fp32 and bf16, so ties stay ties): outputs
    # in fp32, each gradient in its input's dtype. bf16 hidden with an fp32 weight runs the
    # GEMMs in bf16, and the ranks' bf16 partial hidden gradients are summed in bf16: where
    # they cancel, the error is an ulp of the partials (5e-3 seen on |grad| up to 10), not
    # of the sum; hence the absolute tolerance.
    "tied_fp32": dict(op="ckd", problem="tied", mask=True, dtypes=("float32", "float32"),
                      tol=(1e-5, 1e-6), knobs=dict(student_topm=37, kd_type="akl")),
    "tied_bf16_hidden": dict(op="ckd", problem="tied", dtypes=("bfloat16", "float32"),
                             tol=(2e-2, 2e-2), knobs=dict(student_topm=37)),
    "logprobs_bf16_hidden": dict(op="logprobs", problem="tied", dtypes=("bfloat16", "float32"),
                                 tol=(2e-2, 2e-2), knobs=dict(return_entropy=True)),
    "grpo_token_mean": dict(op="grpo", problem="random",
                            knobs=dict(kl_coef=0.1, loss_agg="token_mean")),
    "grpo_seq_mean_on_policy": dict(op="grpo", problem="random", bias=True, on_policy=True,
                                    token_advantages=True,
                                    knobs=dict(kl_coef=0.2, kl_estimator="k3",
                                               loss_agg="seq_mean", temperature=0.9,
                                               clip_eps=(0.1, 0.3),
                                               memory_budget=3 * 500 * 16)),
    "grpo_dr_grpo_k1": dict(op="grpo", problem="tied",
                            knobs=dict(kl_coef=0.05, kl_estimator="k1", loss_agg="dr_grpo")),
}


VOCAB_PARALLEL = {"ckd": sk.vocab_parallel_linear_ckd_loss,
                  "logprobs": sk.vocab_parallel_linear_logprobs,
                  "grpo": sk.vocab_parallel_linear_grpo_loss}


def problem(kind: str) -> dict:
    """The same tensors in every process (fixed seeds), fp64."""
    g = torch.Generator().manual_seed(1 if kind == "random" else 2)
    if kind == "random":
        hidden = torch.randn(*SHAPE, HIDDEN, generator=g, dtype=torch.float64)
        weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.8
    else:  # integer logits in [-28, 28]: exact, and tied at almost every value
        hidden = torch.randint(-2, 3, (*SHAPE, HIDDEN), generator=g).double()
        weight = torch.randint(-2, 3, (VOCAB, HIDDEN), generator=g).double()
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    if kind == "tied":
        bias = bias.round()  # keeps the logits integers
    teacher = (torch.randn(*SHAPE, VOCAB, generator=g, dtype=torch.float64) * 2.5)
    logprobs, ids = teacher.log_softmax(-1).topk(K, dim=-1)
    logprobs[0, 2, 4:] = float("-inf")  # padding entries
    labels = torch.randint(0, VOCAB, SHAPE, generator=g)
    labels[:, ::3] = -100
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 0] = False
    tokens = torch.randint(0, VOCAB, SHAPE, generator=g)
    # GRPO: behaviour and reference log-probs near the policy's, so that some ratios fall
    # inside the clip range and some outside.
    logp = reference.fused_linear_logprobs(hidden, weight, tokens)
    old = logp + 0.3 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    advantages = torch.randn(SHAPE[0], generator=g, dtype=torch.float64)
    token_advantages = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids, logprobs=logprobs,
                labels=labels, mask=mask, tokens=tokens, old=old, ref=ref,
                advantages=advantages, token_advantages=token_advantages)


def evaluate(case: dict, fn, weight, bias) -> dict:
    """Run ``fn`` (the vocab-parallel op, the single-process op or the reference) on the
    case's problem with ``weight`` / ``bias`` (a slice or the full tensors); outputs and
    the gradients of hidden, weight (and bias) for a fixed upstream gradient."""
    p = problem(case["problem"])
    h_dtype, w_dtype = (getattr(torch, d) for d in case.get("dtypes", ("float64", "float64")))
    hidden = p["hidden"].to(h_dtype).requires_grad_()
    leaves = [hidden, weight.to(w_dtype).requires_grad_()]
    b = None
    if case.get("bias"):
        b = bias.clone().requires_grad_()
        leaves.append(b)
    if case["op"] == "ckd":
        out = fn(hidden, leaves[1], p["ids"], p["logprobs"], bias=b,
                 mask=p["mask"] if case.get("mask") else None,
                 labels=p["labels"] if case.get("labels") else None, **case["knobs"])
    elif case["op"] == "grpo":
        adv = p["token_advantages" if case.get("token_advantages") else "advantages"]
        loss, diagnostics = fn(hidden, leaves[1], p["tokens"], adv, p["mask"],
                               old_logprobs=None if case.get("on_policy") else p["old"],
                               ref_logprobs=p["ref"], bias=b, **case["knobs"])
        out = loss
    else:
        out = fn(hidden, leaves[1], p["tokens"], bias=b, **case["knobs"])
    outs = list(out) if isinstance(out, tuple) else [out]
    if case["op"] == "grpo":  # the diagnostics are compared as outputs too (no gradient)
        outs += [diagnostics[k] for k in ("clip_fraction", "mean_kl", "mean_ratio", "logprobs")]
    g = torch.Generator().manual_seed(7)
    diff = [o for o in outs if o.requires_grad]
    ups = [(torch.randn(o.shape, generator=g, dtype=torch.float64) + 0.5).to(o.dtype)
           for o in diff]
    grads = torch.autograd.grad(diff, leaves, ups)
    return {"outs": [o.detach() for o in outs], "grads": [x.detach() for x in grads]}


def error_cases(rank: int, world: int, group) -> dict:
    """Bad inputs: the message every rank raises (no rank may hang in a collective)."""
    p = problem("random")
    start, end = vocab_shard_range(VOCAB, rank, world)
    w = p["weight"][start:end]
    op = functools.partial(sk.vocab_parallel_linear_ckd_loss, group=group)
    bad = {
        "id_outside_vocab": lambda: op(p["hidden"], w, p["ids"].clone().fill_(VOCAB),
                                       p["logprobs"]),
        "topm_above_vocab": lambda: op(p["hidden"], w, p["ids"], p["logprobs"],
                                       student_topm=VOCAB + 1),
        "ranks_disagree": lambda: op(p["hidden"][: 3 - (rank == 1)], w,
                                     p["ids"][: 3 - (rank == 1)],
                                     p["logprobs"][: 3 - (rank == 1)]),
        "bias_not_slice": lambda: op(p["hidden"], w, p["ids"], p["logprobs"], bias=p["bias"]),
        # Wrong on one rank only: every rank must raise, none may wait in a collective.
        "one_rank_bad_weight": lambda: op(p["hidden"], w[:, :4] if rank == 1 else w, p["ids"],
                                          p["logprobs"]),
        "one_rank_other_knob": lambda: op(p["hidden"], w, p["ids"], p["logprobs"],
                                          temperature=0.5 if rank == 1 else 1.0),
        "empty_slice": lambda: op(p["hidden"], w[:0] if rank == 0 else w, p["ids"],
                                  p["logprobs"]),
        "logprob_id_outside": lambda: sk.vocab_parallel_linear_logprobs(
            p["hidden"], w, p["tokens"].clone().fill_(-1), group=group),
    }
    out = {}
    for name, call in bad.items():
        try:
            call()
            out[name] = None
        except (ValueError, TypeError) as err:
            out[name] = f"{type(err).__name__}: {err}"
    return out


def empty_mask(weight) -> dict:
    """An all-false mask: CKD and GRPO losses are 0 with zero gradients, as single-process."""
    p = problem("random")
    none = torch.zeros(SHAPE, dtype=torch.bool)
    out = {}
    for op in ("ckd", "grpo"):
        hidden, w = p["hidden"].clone().requires_grad_(), weight.clone().requires_grad_()
        if op == "ckd":
            loss = sk.vocab_parallel_linear_ckd_loss(hidden, w, p["ids"], p["logprobs"],
                                                     mask=none)
        else:
            loss, _ = sk.vocab_parallel_linear_grpo_loss(hidden, w, p["tokens"],
                                                         p["advantages"], none)
        out[op] = (loss.detach(), *torch.autograd.grad(loss, [hidden, w]))
    return out


def _worker(rank: int, world: int, store: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        start, end = vocab_shard_range(VOCAB, rank, world)
        results = {}
        for name, case in CASES.items():
            p = problem(case["problem"])
            fn = VOCAB_PARALLEL[case["op"]]
            results[name] = evaluate(case, fn, p["weight"][start:end], p["bias"][start:end])
        results["empty_mask"] = empty_mask(p["weight"][start:end])
        # A subgroup (all ranks here) takes the same path as the default group.
        results["errors"] = error_cases(rank, world, dist.new_group(list(range(world))))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int, tmp_path, timeout=TIMEOUT_S, preload=()) -> list:
    """Spawn ``world`` gloo processes running ``worker(rank, world, store, out_dir)`` and
    load each rank's saved results; a failing rank's traceback fails the test. ``preload``:
    more modules for the fork server to import once (it starts once per pytest process,
    with the first caller's list; later callers' ranks import the rest themselves)."""
    out_dir = tmp_path / f"world{world}"
    out_dir.mkdir()
    # forkserver: one server process imports torch and this module once, and every rank
    # is forked from it (cheap, and safe: the server never ran an OpenMP region). Spawn
    # would import torch again in every rank, several seconds each on a loaded CPU. The
    # second module is what torch.autograd.grad imports on first use (sympy, ~2 s).
    mp.get_context("forkserver").set_forkserver_preload(
        [worker.__module__, "torch.fx.experimental.symbolic_shapes", *preload])
    ctx = mp.start_processes(worker, args=(world, str(out_dir / "store"), str(out_dir)),
                             nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish in {timeout} s")
    except Exception as err:
        errs = sorted(out_dir.glob("rank*.err"))
        detail = "\n".join(e.read_text() for e in errs)
        raise AssertionError(f"a rank failed: {err}\n{detail}") from None
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(_worker, world, tmp_path_factory.mktemp("vp"))


def expected(case: dict, fn) -> dict:
    p = problem(case["problem"])
    return evaluate(case, fn, p["weight"], p["bias"])


def combined(case: dict, results: list) -> dict:
    """The ranks' outputs (checked equal on every rank) with the weight and bias gradients
    concatenated in rank order: the gradients of the full tensors."""
    first = results[0]
    for r, res in enumerate(results[1:], start=1):
        for a, b in zip(first["outs"], res["outs"]):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"rank {r}'s output differs")
        torch.testing.assert_close(res["grads"][0], first["grads"][0], rtol=0, atol=1e-13,
                                   msg=f"rank {r}'s hidden gradient differs")
    grads = [first["grads"][0]]
    for i in range(1, len(first["grads"])):
        grads.append(torch.cat([res["grads"][i] for res in results]))
    return {"outs": first["outs"], "grads": grads}


SINGLE = {"ckd": functools.partial(sk.fused_linear_ckd_loss, backend="torch"),
          "logprobs": functools.partial(sk.fused_linear_logprobs, backend="torch"),
          "grpo": functools.partial(sk.fused_linear_grpo_loss, backend="torch")}
REFERENCE = {"ckd": reference.fused_linear_ckd_loss, "logprobs": reference.fused_linear_logprobs,
             "grpo": reference.fused_linear_grpo_loss}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("against", ["single_process", "reference"])
def test_equals_single_process_and_reference(ranks, name, against):
    world, results = ranks
    case = CASES[name]
    if "dtypes" in case and against == "reference":
        pytest.skip("the fp64 reference takes fp64 inputs; this case checks other dtypes")
    got = combined(case, [res[name] for res in results])
    rtol, atol = case.get("tol", (1e-10, 1e-10))
    fn = (SINGLE if against == "single_process" else REFERENCE)[case["op"]]
    want = expected(case, fn)
    labels = {"ckd": ["loss"], "logprobs": ["logp", "entropy"],
              "grpo": ["loss", "clip_fraction", "mean_kl", "mean_ratio", "logprobs"]}[case["op"]]
    for what, a, b in zip(labels, got["outs"], want["outs"]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, what=what: f"{world} ranks, {what}: {m}")
    for what, a, b in zip(["grad hidden", "grad weight", "grad bias"], got["grads"],
                          want["grads"]):
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, what=what: f"{world} ranks, {what}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_tied_case_straddles_rank_boundaries(world):
    """The tied problem is what it claims: in some row, the ids tied at the m-th value
    are split into kept and dropped ones, and the kept ones span two or more slices."""
    p = problem("tied")
    logits = p["hidden"].reshape(-1, HIDDEN) @ p["weight"].T
    m = CASES["tied_fkl"]["knobs"]["student_topm"]
    order = logits.argsort(dim=1, descending=True, stable=True)  # lowest ids first in ties
    owner = torch.tensor([r for r in range(world)
                          for _ in range(*vocab_shard_range(VOCAB, r, world))])
    straddles = 0
    for row, ranked in zip(logits, order):
        threshold = row[ranked[m - 1]]
        tied = (row == threshold).nonzero().squeeze(1)
        kept = ranked[:m][row[ranked[:m]] == threshold]
        if len(kept) < len(tied) and owner[kept].unique().numel() > 1:
            straddles += 1
    assert straddles >= 3


def test_errors_name_the_argument(ranks):
    world, results = ranks
    errors = [res["errors"] for res in results]
    rank_specific = ("bias_not_slice", "one_rank_bad_weight")  # messages about a rank's slice
    for e in errors:  # every rank raises (none hangs)
        assert all(e[k] and e[k] == errors[0][k] for k in e if k not in rank_specific), e
        assert all(e[k] for k in rank_specific), e
    e = errors[0]
    assert "rank(s) [1]" in e["one_rank_bad_weight"]
    assert "hidden size 4" in errors[1]["one_rank_bad_weight"]
    assert "disagree on the other arguments" in e["one_rank_other_knob"]
    assert "temperature" in e["one_rank_other_knob"]
    assert "weight: every rank needs at least one vocabulary row" in e["empty_slice"]
    assert "teacher_ids" in e["id_outside_vocab"] and f"[0, {VOCAB})" in e["id_outside_vocab"]
    assert "student_topm" in e["topm_above_vocab"] and f"V={VOCAB}" in e["topm_above_vocab"]
    assert "disagree on hidden (tokens)" in e["ranks_disagree"]
    assert "bias" in e["bias_not_slice"] and "[V_r]" in e["bias_not_slice"]
    assert "token_ids" in e["logprob_id_outside"]


def test_empty_mask_gives_zero_loss_and_gradients(ranks):
    _, results = ranks
    for res in results:
        for op, tensors in res["empty_mask"].items():
            for t in tensors:
                assert t.abs().max() == 0, op


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    p = problem("random")
    with pytest.raises(RuntimeError, match="init_process_group"):
        sk.vocab_parallel_linear_ckd_loss(p["hidden"], p["weight"][:500], p["ids"],
                                          p["logprobs"])


def test_vocab_shard_range():
    spans = [vocab_shard_range(1000, r, 3) for r in range(3)]
    assert spans == [(0, 334), (334, 667), (667, 1000)]
    with pytest.raises(ValueError, match="rank"):
        vocab_shard_range(1000, 3, 3)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_shard_range(2, 0, 3)
