"""Padding-free packing in the Sim-RL stage (``train.packing``, the CKD key): each
micro-batch's prompt + completion sequences in one row, positions restarting per sequence
and no attention mask, for the GRPO loss forward and for the recorded reference / old /
teacher log-probs. The run must record, log, compute gradients and train what the
right-padded run does.

The tiny policy, the config factory and the fake reward are test_simrl's (a random policy
almost never writes a valid tool call, so groups are kept only with the fake reward, which
the test patches in).
"""

from pathlib import Path

import pytest
import torch

import test_simrl
from star_train.runtime.trainer import Trainer
from star_train.stages import sampling, simrl
from test_simrl import _run
from train_fixtures import log_lines, tiny_qwen3, weights

policy_dir, make_config = test_simrl.policy_dir, test_simrl.make_config
FIELDS = ("old_logprobs", "ref_logprobs", "teacher_logprobs")


def test_packed_micro_batches_record_and_train_as_padded_ones(make_config, tokenizer,
                                                              monkeypatch):
    """PPO mini-batches of 3 (recorded old log-probs), micro-batches of 2 completions of
    varied lengths, on-policy KD with a teacher of other weights (its log-probs recorded
    too), two epochs over a rollout: every recorded log-prob, every step's gradient and
    logged value, and the trained weights equal the padded run's."""
    monkeypatch.setattr(sampling, "similarity_reward", test_simrl.fake_reward)
    batches, pack = [], simrl.pack_batch

    def spy(sequences):
        batches.append(pack(sequences))
        return batches[-1]

    monkeypatch.setattr(simrl, "pack_batch", spy)
    grads = []
    clip = Trainer._clip_gradients

    def recording_clip(trainer):
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return clip(trainer)

    monkeypatch.setattr(Trainer, "_clip_gradients", recording_clip)
    runs = {}
    for name, packing in (("padded", False), ("packed", True)):
        cfg = make_config(out=name, rollout={"max_sampling_rounds": 3},
                          teacher={"model": tiny_qwen3(32, 2, 7)},
                          grpo={"kl_coef": 0.5, "op_kl_coef": 0.5},
                          train={"samples_per_step": 3, "max_epochs": 2, "micro_batch_size": 2,
                                 "lr": 1e-3, "max_steps": 4, "packing": packing})
        start = len(grads)
        _, reports = _run(cfg, tokenizer)
        runs[name] = (cfg, reports, grads[start:])
    assert batches and all(b["attention_mask"] is None and b["input_ids"].shape[0] == 1
                           for b in batches)

    (padded, padded_reports, padded_grads), (packed, packed_reports, packed_grads) = \
        runs["padded"], runs["packed"]
    groups = [[g for g in r.detail if g.kept] for r in (padded_reports[0], packed_reports[0])]
    assert groups[0] and len(groups[0]) == len(groups[1])
    lengths = {len(c) for g in groups[0] for c in g.completions}
    assert len(lengths) > 1  # padding really differs between the micro-batch's rows
    for a, b in zip(*groups):
        assert [c.tolist() for c in a.completions] == [c.tolist() for c in b.completions]
        for field in FIELDS:
            for x, y in zip(getattr(a, field), getattr(b, field), strict=True):
                torch.testing.assert_close(y, x, rtol=0, atol=1e-5)

    a, b = log_lines(padded.train.out_dir), log_lines(packed.train.out_dir)
    assert [x["samples"] for x in a] == [x["samples"] for x in b] and len(a) == 4
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in ("loss", "kl", "clip_fraction", "op_kl", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-8), (x["step"], key)
        assert {k: v for k, v in x.items() if not isinstance(v, float)} == \
            {k: v for k, v in y.items() if not isinstance(v, float)}
    # Step 1's whole gradient (both runs start from the same weights; afterwards Adam's
    # normalised updates carry float noise in near-zero gradient entries into the weights,
    # so later steps are compared by the logged norms above): elementwise up to 1e-5 of
    # each tensor's largest entry.
    assert len(padded_grads) == len(packed_grads) == 4
    for name, x in padded_grads[0].items():
        torch.testing.assert_close(packed_grads[0][name], x, rtol=1e-4,
                                   atol=1e-5 * x.abs().max().item(), msg=name)
    wa, wb = weights(Path(padded.train.out_dir) / "final"), weights(Path(packed.train.out_dir) / "final")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-5, msg=name)
