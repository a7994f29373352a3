"""On-policy KD in the Sim-RL stage (``grpo.op_kl_coef``, ``teacher.model``): the op-KL term
and the step's loss and gradient against an independent fp64 full-logits computation, off
by default, zero for a teacher equal to the student, exact resume, and refused configs.

The tiny policy, the config factory and the fake reward are test_simrl's (imported, not
copied): a random policy almost never writes a valid tool call, so groups are kept only
with the fake reward, which the tests patch in and say so.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_simrl
from star_train.runtime.config import ConfigError, ModelSpec, from_dict
from star_train.runtime.models import load_model
from star_train.stages import sampling, simrl
from test_simrl import _run
from train_fixtures import log_lines, tiny_qwen3

# test_simrl's fixtures, used here under their names (shared rather than copied)
policy_dir, make_config = test_simrl.policy_dir, test_simrl.make_config


def fake_reward(response, reference, tools, **_):
    """test_simrl's fake reward, whatever further keywords the stage passes."""
    return test_simrl.fake_reward(response, reference, tools)

CPU = torch.device("cpu")
# A random teacher of the policy's shape and vocabulary, other weights.
OTHER_TEACHER = {"model": tiny_qwen3(32, 2, 7)}


def _logprobs_fp64(model, prompt_ids, completion):
    """fp64 log-probs of the completion tokens from the model's full logits."""
    ids = torch.cat([prompt_ids, completion])[None]
    logits = model(ids, logits_to_keep=len(completion) + 1).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(1, completion[:, None]).squeeze(1)


def _kl_estimate(student, teacher, estimator):
    """The released compute_approx_kl, written from its formulas: d = log pi - log pi_t;
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d, each clamped to [-10, 10]."""
    d = student - teacher
    value = {"k1": d, "k2": 0.5 * d ** 2, "k3": torch.exp(-d) - 1 + d}[estimator]
    return value.clamp(-10, 10)


def _weights(out_dir, name="final"):
    return load_file(str(Path(out_dir) / name / "model.safetensors"))


def _without_time(lines):
    return [{k: v for k, v in line.items() if k not in ("seconds", "tokens_per_s")}
            for line in lines]


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_op_kl_step_matches_a_full_logits_computation(make_config, tokenizer, monkeypatch,
                                                      estimator):
    """Fake rewards (module docstring). One on-policy step with a teacher of other weights:
    the recorded teacher log-probs, the logged op_kl, loss and pre-clip gradient norm
    against autograd through the fp64 objective: token mean over the step of
    -min(r A, clip(r) A) + 1e-3 k2(pi, pi_ref) + 0.5 k(pi, pi_teacher). k2 (the default)
    exercises the clamp: the policy's <|im_end|> log-prob is ~-2.3, the random teacher's
    ~-12; k3 is not symmetric, so it checks which log-prob is whose."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    grpo = {"op_kl_coef": 0.5} if estimator == "k2" else {"op_kl_coef": 0.5,
                                                          "op_kl_estimator": estimator}
    cfg = make_config(rollout={"max_sampling_rounds": 3}, teacher=OTHER_TEACHER, grpo=grpo,
                      train={"max_steps": 1})
    assert cfg.grpo.op_kl_estimator == estimator  # default k2: the released --kl_estimator
    _, reports = _run(cfg, tokenizer)
    logged = log_lines(cfg.train.out_dir)[0]
    policy = load_model(cfg.policy.model, torch.float64, CPU)
    teacher = load_model(ModelSpec(**OTHER_TEACHER["model"]), torch.float64, CPU)
    kept = [g for g in reports[0].detail if g.kept]
    assert kept and logged["updated"]
    terms, op_kl_sum, count, clamped = 0.0, 0.0, 0, 0
    for group in kept:
        assert len(group.teacher_logprobs) == len(group.completions)
        for completion, advantage, recorded in zip(group.completions, group.advantages,
                                                   group.teacher_logprobs):
            logp = _logprobs_fp64(policy, group.prompt_ids, completion)
            with torch.no_grad():
                target = _logprobs_fp64(teacher, group.prompt_ids, completion)
            torch.testing.assert_close(recorded.double(), target, atol=2e-5, rtol=0)
            ratio = torch.exp(logp - logp.detach())
            surrogate = torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
            op_kl = _kl_estimate(logp, target, estimator)
            # reference = the initial policy = this policy: its k2 term is 0 with gradient 0
            terms = terms + (-surrogate + 0.5 * op_kl).sum()
            op_kl_sum += op_kl.sum().item()
            clamped += int((op_kl == 10).sum())
            count += len(completion)
    loss = terms / count
    assert op_kl_sum / count > 1e-3 and bool(clamped) == (estimator == "k2")
    assert logged["op_kl"] == pytest.approx(op_kl_sum / count, rel=1e-5)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in policy.parameters() if p.grad is not None))
    assert logged["grad_norm"] == pytest.approx(norm.item(), rel=1e-3)


class _RecordedStage(simrl.SimRLStage):
    """The stage, kept for a look after its run."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _RecordedStage.last = self


def test_off_by_default_and_zero_for_the_student_as_teacher(make_config, tokenizer,
                                                            monkeypatch, policy_dir):
    """Fake rewards (module docstring). Off (the default, or coef 0 with a teacher named):
    the same weights and log, no op_kl field, and the teacher never loaded. The policy as
    its own teacher (k2): the first step logs op_kl 0 and the off run's loss; on that
    step's samples with the initial policy, every estimator gives op_kl 0 and the loss
    without op-KD, and the same gradient for k2 and k3 (their derivative at 0 is 0), another
    one for k1 (derivative 1)."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    train = {"max_steps": 1, "lr": 1e-3}
    off = make_config(out="off", train=train)
    _run(off, tokenizer)
    named = make_config(out="named", teacher=OTHER_TEACHER, train=train)

    def refuse(*_):
        raise AssertionError("the teacher is loaded with op_kl_coef = 0")

    real = simrl.load_teacher
    monkeypatch.setattr(simrl, "load_teacher", refuse)
    _run(named, tokenizer)
    monkeypatch.setattr(simrl, "load_teacher", real)
    base_log = _without_time(log_lines(off.train.out_dir))
    assert base_log == _without_time(log_lines(named.train.out_dir))
    assert base_log[0]["updated"] and "op_kl" not in base_log[0]
    base = _weights(off.train.out_dir)
    assert all(torch.equal(base[k], w) for k, w in _weights(named.train.out_dir).items())

    monkeypatch.setattr(simrl, "SimRLStage", _RecordedStage)
    cfg = make_config(out="self", teacher={"model": {"path": policy_dir}}, train=train,
                      grpo={"op_kl_coef": 1.0})
    _run(cfg, tokenizer)
    line = log_lines(cfg.train.out_dir)[0]
    assert line["op_kl"] == 0.0 and line["loss"] == base_log[0]["loss"]

    stage, teacher = _RecordedStage.last, _RecordedStage.last.teacher
    initial = load_model(cfg.policy.model, torch.float32, CPU)
    # the micro-batches the log-probs were recorded in (padding changes the rounding)
    micro = cfg.train.micro_batch_size
    parts = [list(range(len(stage.samples)))[i:i + micro]
             for i in range(0, len(stage.samples), micro)]

    def step(teacher):
        stage.teacher = teacher
        initial.zero_grad(set_to_none=True)
        loss_sum, op_kl_sum = 0.0, 0.0
        for part in parts:
            loss, sums = stage.micro_loss(initial, part)
            loss.backward()
            loss_sum, op_kl_sum = loss_sum + loss.item(), op_kl_sum + sums.get("op_kl", 0.0)
        return loss_sum, op_kl_sum, [p.grad for p in initial.parameters()]

    loss_off, _, grads_off = step(None)
    for estimator in ("k1", "k2", "k3"):
        stage.cfg.grpo.op_kl_estimator = estimator
        loss, op_kl, grads = step(teacher)
        assert op_kl == 0.0 and loss == loss_off, estimator
        same = all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grads, grads_off))
        assert same == (estimator != "k1"), estimator


def test_interrupted_run_with_op_kd_resumes_exactly(make_config, tokenizer, monkeypatch):
    """Fake rewards (module docstring); mini-batches of 4, so checkpoints wait for the end
    of a rollout (2 steps). Killed after step 3, resumed from step 2: the uninterrupted
    run's weights and log (op_kl included): the teacher's log-probs are recorded again
    for the re-sampled rollout, exactly."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    settings = dict(teacher=OTHER_TEACHER, grpo={"op_kl_coef": 0.1, "op_kl_estimator": "k3"},
                    train={"samples_per_step": 4, "max_steps": 3, "save_every": 1, "lr": 1e-3})
    straight = make_config(out="straight", **settings)
    _run(straight, tokenizer)
    cfg = make_config(out="resumed", **settings)

    def crash(step, report):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simrl.run_simrl(cfg, tokenizer=tokenizer, on_step_end=crash, log=lambda *_: None)
    summary, _ = _run(cfg, tokenizer)
    assert summary["start_step"] == 2 and summary["steps"] == 3
    lines = _without_time(log_lines(cfg.train.out_dir))
    assert lines == _without_time(log_lines(straight.train.out_dir))
    assert all(line["updated"] and line["op_kl"] > 0 for line in lines)
    wa, wb = _weights(straight.train.out_dir), _weights(cfg.train.out_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("values, match", [
    ({"grpo": {"op_kl_coef": 0.1}}, r"grpo\.op_kl_coef > 0 needs teacher\.model"),
    ({"grpo": {"op_kl_coef": 0.1}, "teacher": {"model": {"seed": 3}}}, r"teacher\.model"),
    ({"grpo": {"op_kl_coef": -0.1}}, r"grpo\.op_kl_coef"),
    ({"grpo": {"op_kl_estimator": "k4"}}, r"grpo\.op_kl_estimator"),
    ({"teacher": {"modle": {}}}, "modle"),
])
def test_config_errors_name_the_key(values, match):
    base = {"data": {"path": "x.jsonl"}, "policy": {"model": {"path": "p"}}, **values}
    with pytest.raises(ConfigError, match=match):
        from_dict(simrl.SimRLRunConfig, base)


def test_teacher_of_another_vocabulary_is_refused(make_config, tokenizer):
    """Refused before any sampling: the KL compares the two models' log-probs of the same
    token ids."""
    bigger = tiny_qwen3(32, 2, 7)
    bigger["config"] = {**bigger["config"], "vocab_size": bigger["config"]["vocab_size"] + 64}
    cfg = make_config(teacher={"model": bigger}, grpo={"op_kl_coef": 0.1})
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        _run(cfg, tokenizer)
    assert not (Path(cfg.train.out_dir) / "train_log.jsonl").exists()
