"""Bad input gets a clear error naming the argument, before any kernel runs."""

import warnings

import pytest
import torch

import star_kernels as sk
from ckd_cases import make_problem


@pytest.fixture
def p():
    return make_problem(6, 4, 19, 3)


def call(p, **over):
    args = dict(hidden=p["hidden"], weight=p["weight"], teacher_ids=p["ids"],
                teacher_logprobs=p["logprobs"], student_topm=4, backend="torch")
    args.update(over)
    return sk.fused_linear_ckd_loss(**args)


@pytest.mark.parametrize("over,match", [
    (lambda p: dict(hidden=p["hidden"][0]), "hidden must be"),
    (lambda p: dict(weight=p["weight"][:, :3]), "hidden size"),
    (lambda p: dict(hidden=p["hidden"].half(), weight=p["weight"].bfloat16()),
     "hidden torch.float16, weight torch.bfloat16: float16 and bfloat16"),
    (lambda p: dict(hidden=p["hidden"].long()), "hidden must be a floating"),
    (lambda p: dict(bias=torch.zeros(5, dtype=torch.float64)), "bias must be"),
    (lambda p: dict(teacher_ids=p["ids"][:5]), "teacher_ids must have shape"),
    (lambda p: dict(teacher_ids=p["ids"].float()), "teacher_ids must have dtype"),
    (lambda p: dict(teacher_logprobs=p["logprobs"][:, :2]), "teacher_logprobs must have shape"),
    (lambda p: dict(teacher_ids=p["ids"].clone().fill_(19)), "teacher_ids holds id 19"),
    (lambda p: dict(teacher_ids=-p["ids"] - 1), "outside the vocabulary"),
    (lambda p: dict(teacher_logprobs=p["logprobs"].clone().fill_(float("nan"))), "NaN"),
    (lambda p: dict(teacher_logprobs=p["logprobs"].clone().fill_(float("inf"))), r"\+inf"),
    (lambda p: dict(teacher_ids=p["ids"][:, :1].repeat(1, 3)), "repeats an id"),
    # Logits passed for log-probs: a positive value, or more than all the probability mass.
    (lambda p: dict(teacher_logprobs=p["logprobs"] + 3.0),
     r"teacher_logprobs holds 2\.\d+ > 0: expected the teacher's log-probabilities"),
    (lambda p: dict(teacher_logprobs=torch.full((6, 3), -0.9, dtype=torch.float64)),
     r"teacher_logprobs has a token whose probabilities add up to 1\.22 > 1.*not logits"),
    (lambda p: dict(validate="some"), "validate must be one of"),
    (lambda p: dict(student_topm=20), "student_topm"),
    (lambda p: dict(student_topm=0), "student_topm"),
    (lambda p: dict(teacher_ids=torch.zeros(6, 20, dtype=torch.long),
                    teacher_logprobs=torch.zeros(6, 20)), "K=20 is larger than the vocabulary"),
    (lambda p: dict(kd_ratio=0.5), "labels is required"),
    (lambda p: dict(kd_ratio=0.5, labels=torch.full((6,), 19)), "labels holds id 19"),
    (lambda p: dict(kd_ratio=0.5, labels=torch.zeros(5, dtype=torch.long)),
     "labels must have shape"),
    (lambda p: dict(kd_ratio=1.5), "kd_ratio"),
    (lambda p: dict(temperature=0.0), "temperature"),
    (lambda p: dict(tail_coef=-1.0), "tail_coef"),
    (lambda p: dict(reduction="avg"), "reduction"),
    (lambda p: dict(mask=torch.ones(5, dtype=bool)), "mask must have shape"),
    (lambda p: dict(mask=torch.ones(6)), "mask must have dtype"),
    (lambda p: dict(memory_budget=-1), "memory_budget"),
    (lambda p: dict(backend="fast"), "backend must be one of"),
    # A second device without a GPU: the meta device.
    (lambda p: dict(weight=p["weight"].to("meta")), "weight is on meta but hidden is on cpu"),
    (lambda p: dict(teacher_ids=p["ids"].to("meta")), "teacher_ids is on meta"),
    (lambda p: dict(mask=torch.ones(6, dtype=bool, device="meta")), "mask is on meta"),
])
def test_bad_input_names_the_argument(p, over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(p, **over(p))


def test_padding_entries_may_repeat_ids_and_add_nothing(p):
    ids, lps = p["ids"].clone(), p["logprobs"].clone()
    base = call(p, teacher_ids=ids, teacher_logprobs=lps, reduction="none")
    wider_ids = torch.cat([ids, ids[:, :1], ids[:, :1]], 1)
    wider_lps = torch.cat([lps, torch.full((6, 2), float("-inf"), dtype=lps.dtype)], 1)
    padded = call(p, teacher_ids=wider_ids, teacher_logprobs=wider_lps, reduction="none")
    torch.testing.assert_close(base, padded)


def test_unavailable_backend_is_named(p, monkeypatch):
    monkeypatch.setattr(sk._backends, "cpp_available", lambda: False)
    with pytest.raises(sk.BackendUnavailableError, match="backend 'cpp'"):
        call(p, backend="cpp")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(sk.BackendUnavailableError, match="backend 'triton'"):
        call(p, backend="triton")


def test_auto_without_cpp_falls_back_to_torch_with_one_warning(p, monkeypatch):
    monkeypatch.setattr(sk._backends, "cpp_available", lambda: False)
    monkeypatch.setattr(sk._backends, "_warned_no_cpp", False)
    with pytest.warns(UserWarning, match="C\\+\\+ CPU backend .* not built"):
        first = call(p, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = call(p, backend="auto")
    torch.testing.assert_close(first, call(p, backend="torch"))
    assert first == second
