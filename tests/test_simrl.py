"""The Sim-RL stage: config, rollouts and reward, dynamic filtering, the GRPO loss against
full logits, and exact resume. (Over 400 lines: the stage's end-to-end cases share the
policy fixture built here, which is expensive to build twice.)

A random tiny policy almost never writes a valid tool call, so the real similarity reward
gives it -1 everywhere and every group is filtered out. Tests that need groups to be kept
(filtering, the loss, resume) monkeypatch ``star_train.stages.sampling.similarity_reward`` with a
deterministic fake (a hash of the completion text), and say so.
"""

import json
import math
import zlib
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from star_train.chat.tokenizer import QWEN3_VOCAB_SIZE
from star_train.data.records import build_example
from star_train.reward import group_advantages, similarity_reward
from star_train.runtime.config import ModelSpec, from_dict, load_config
from star_train.runtime.generation import sample_completions
from star_train.runtime.models import load_model
from star_train.stages import sampling, simrl
from train_fixtures import TEXT_ROWS, log_lines, tiny_qwen3, weather_records, write_jsonl

EOS = "<|im_end|>"


def fake_reward(response, reference, tools):
    """Deterministic rewards in {0, .25, .5, .75, 1} from the completion text; a text
    reference always scores 0, so those prompt groups are constant and get dropped."""
    if not reference.get("tool_calls"):
        return 0.0
    return (zlib.crc32(response.encode()) % 5) / 4


@pytest.fixture(scope="module")
def policy_dir(tokenizer, tmp_path_factory):
    """A tiny random Qwen3 saved as a local folder, with two changes:
    - <|im_end|> is sampled with probability ~0.1 at every position, so completions end at
      varied lengths (a random head almost never samples it): hidden dimension 0 is made
      a near-constant (a constant in every token embedding dominates the residual stream)
      and the <|im_end|> row of lm_head reads only that dimension;
    - its generation_config.json is a trap (top_k=1, temperature 0.05, min_p=0.99: each
      alone would make the 8 samples of a group identical): the stage must sample from
      the plain softmax regardless."""
    model = load_model(ModelSpec(**tiny_qwen3(32, 2, 2)), torch.float32, torch.device("cpu"))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        hidden = torch.cat([model.model(torch.tensor([tokenizer.encode(build_example(r)[0])]))
                            .last_hidden_state[0] for r in weather_records()])
        model.lm_head.weight[eos] = 0.0
        # the other logits are near 0, so p(eos) ~ e^z / (V + e^z) = 0.1
        model.lm_head.weight[eos, 0] = math.log(0.11 * QWEN3_VOCAB_SIZE) / hidden[:, 0].mean()
    model.generation_config.update(do_sample=True, top_k=1, temperature=0.05, min_p=0.99)
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def make_config(tmp_path, policy_dir):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, weather_records())

    def make(out="run", **sections):
        values = {
            "data": {"path": str(data)},
            "policy": {"model": {"path": policy_dir}, "gradient_checkpointing": False},
            "rollout": {"num_samples": 4, "prompts_per_rollout": 2, "max_new_tokens": 12,
                        "generate_batch_prompts": 2, "max_sampling_rounds": 2},
            # one update per rollout over its whole token mean; the released mini-batching
            # has its own tests below
            "train": {"out_dir": str(tmp_path / out), "dtype": "float32", "device": "cpu",
                      "micro_batch_size": 3, "seed": 1, "samples_per_step": 0,
                      "loss_normalization": "step_tokens", "lr_schedule": "constant",
                      "warmup_ratio": 0.0},
        }
        for section, table in sections.items():
            values[section] = {**values.get(section, {}), **table}
        return from_dict(simrl.SimRLRunConfig, values)
    return make


def _run(cfg, tokenizer, **kwargs):
    reports = []
    summary = simrl.run_simrl(cfg, tokenizer=tokenizer, log=lambda *_: None,
                              on_step_end=lambda step, report: reports.append(report), **kwargs)
    return summary, reports


# --- config --------------------------------------------------------------------------

def test_config_file_defaults_relative_paths_and_overrides(tmp_path):
    path = tmp_path / "rl.toml"
    path.write_text('[data]\npath = "d.jsonl"\n[policy.model]\npath = "ckd/final"\n'
                    '[train]\nout_dir = "out"\n')
    cfg = load_config(simrl.SimRLRunConfig, path, {"grpo.kl_coef": 0.01, "rollout.prompts_per_rollout": 4})
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.policy.model.path == str(tmp_path / "ckd" / "final")
    assert cfg.train.out_dir == str(tmp_path / "out")
    assert (cfg.grpo.kl_coef, cfg.rollout.prompts_per_rollout) == (0.01, 4)
    # STAR's released Sim-RL settings are the defaults
    assert (cfg.rollout.num_samples, cfg.rollout.temperature, cfg.rollout.max_new_tokens) \
        == (8, 1.0, 512)
    assert (cfg.grpo.clip_eps, cfg.grpo.kl_estimator, cfg.train.lr, cfg.train.episodes) \
        == (0.2, "k2", 3e-7, 3)


@pytest.mark.parametrize("values, match", [
    ({"rollout": {"num_sampels": 8}}, "num_sampels"),
    ({"polcy": {}}, "polcy"),
    ({"rollout": {"num_samples": 1}}, "rollout.num_samples"),
    ({"rollout": {"prompts_per_rollout": 0}}, "rollout.prompts_per_rollout"),
    ({"rollout": {"max_sampling_rounds": 0}}, "rollout.max_sampling_rounds"),
    ({"rollout": {"temperature": 0.0}}, "rollout.temperature"),
    ({"grpo": {"kl_estimator": "k4"}}, "grpo.kl_estimator"),
    ({"grpo": {"clip_eps": -0.1}}, "grpo.clip_eps"),
    ({"train": {"episodes": 0}}, "train.episodes"),
    ({"train": {"dtype": "float16"}}, "train.dtype"),
    ({"data": {"max_prompt_length": 0}}, "data.max_prompt_length"),
    ({"policy": {"model": {}}}, "policy.model"),
])
def test_config_errors_name_the_key(values, match):
    base = {"data": {"path": "x.jsonl"}, "policy": {"model": {"path": "p"}}}
    for section, table in values.items():
        base[section] = {**base.get(section, {}), **table}
    with pytest.raises(ValueError, match=match):
        from_dict(simrl.SimRLRunConfig, base)


# --- dynamic filtering, without a model ---------------------------------------------------

def test_collect_groups_refills_until_full_and_stops_at_the_round_limit(make_config,
                                                                        monkeypatch):
    """sample_round stubbed: prompt indices divisible by 3 come back dropped."""
    stream = simrl.PromptStream(num_prompts=10, episodes=1, seed=0)
    order = stream.take(0, 10)

    def fake_round(policy, tokenizer, prompts, indices, cfg, step, sampling_round, autocast):
        return [simrl.PromptGroup(i, None, [], [], [0.0], i % 3 != 0, sampling_round)
                for i in indices]

    monkeypatch.setattr(simrl, "sample_round", fake_round)
    cfg = make_config(rollout={"prompts_per_rollout": 4, "max_sampling_rounds": 10})
    groups, position, rounds = simrl.collect_groups(None, None, None, stream, 0, cfg, 0, None)
    kept = [g.prompt_index for g in groups if g.kept]
    assert len(kept) == 4 and [g.prompt_index for g in groups] == order[:position]
    assert kept == [i for i in order[:position] if i % 3 != 0]
    # each round asks only for the groups still missing
    firsts = [sum(g.sampling_round == r for g in groups) for r in range(rounds)]
    assert firsts[0] == 4 and all(a >= b for a, b in zip(firsts, firsts[1:]))

    cfg = make_config(rollout={"prompts_per_rollout": 4, "max_sampling_rounds": 1})
    groups, position, rounds = simrl.collect_groups(None, None, None, stream, 0, cfg, 0, None)
    assert (rounds, position, len(groups)) == (1, 4, 4)  # trains on fewer groups
    groups, position, _ = simrl.collect_groups(None, None, None, stream, 8, make_config(
        rollout={"prompts_per_rollout": 4, "max_sampling_rounds": 10}), 0, None)
    assert position == 10 and [g.prompt_index for g in groups] == order[8:]  # stream ended


# --- the stage ----------------------------------------------------------------------------

def test_sampling_is_a_function_of_the_seed(policy_dir, tokenizer):
    """A resumed step re-samples what the uninterrupted run sampled: generate_completions
    depends on its seed only, not on (nor changes) the global RNG state."""
    policy = load_model(ModelSpec(path=policy_dir), torch.float32, torch.device("cpu"))
    prompt = [torch.tensor(tokenizer.encode(build_example(weather_records()[0])[0]))]
    kwargs = dict(temperature=1.0, max_new_tokens=6, eos_id=tokenizer.convert_tokens_to_ids(EOS),
                  pad_id=tokenizer.pad_token_id, autocast=nullcontext())

    def sample(seed):
        return [c.tolist() for c in sample_completions(policy, prompt, 4, seed=seed,
                                                               **kwargs)[0]]

    state = torch.get_rng_state()
    first = sample(11)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(100)  # move the global RNG: must not matter
    assert sample(11) == first and sample(12) != first
    seeds = {simrl.sampling_seed(1, step, r, c) for step in range(3) for r in range(3)
             for c in range(3)}
    assert len(seeds) == 27


def test_end_to_end_with_the_real_reward(make_config, tokenizer, tmp_path, capsys):
    """Real similarity reward, default group size 8; one row too long for the prompt limit."""
    long_row = {**weather_records()[0], "id": "long"}
    long_row["messages"] = [{"role": "user", "content": "weather? " * 400},
                            long_row["messages"][-1]]
    data = tmp_path / "with_long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in weather_records() + [long_row]))
    cfg = make_config(data={"path": str(data), "max_prompt_length": 400},
                      rollout={"num_samples": 8}, train={"max_steps": 1})
    reports = []
    summary = simrl.run_simrl(cfg, tokenizer=tokenizer,
                              on_step_end=lambda step, report: reports.append(report))
    out = capsys.readouterr().out
    assert "7 prompts; skipped 1 longer than 400 tokens" in out and "step 1" in out
    assert summary["skipped_prompts"] == 1 and summary["steps"] == 1
    (line,) = log_lines(cfg.train.out_dir)
    assert line == reports[0].record
    groups = reports[0].detail
    assert line["groups_sampled"] == line["prompts_consumed"] == len(groups) >= 2
    assert line["prompts"] == [g.prompt_index for g in groups]
    records = weather_records()
    for group in groups:
        assert len(group.completions) == 8 and group.kept == (0.01 < sum(group.rewards) / 8 < 0.99)
        # the sampler ignored the folder's near-greedy generation config
        assert len({tuple(c.tolist()) for c in group.completions}) > 1
        record = records[group.prompt_index]
        prompt_text = build_example(record)[0]
        assert torch.equal(group.prompt_ids, torch.tensor(tokenizer.encode(prompt_text)))
        for ids, text, reward in zip(group.completions, group.texts, group.rewards):
            assert 1 <= len(ids) <= 12 and (EOS not in text[:-len(EOS)])
            assert text == "<think>\n" + tokenizer.decode(ids.tolist())
            assert reward == similarity_reward(text, record["messages"][-1], record["tools"])
    rewards = [r for g in groups for r in g.rewards]
    assert line["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert -1.0 <= line["reward_mean"] <= 1.0 and 0.0 <= line["kept_fraction"] <= 1.0
    assert 0.0 < line["truncated_fraction"] < 1.0  # varied lengths: some ended with <|im_end|>
    if not line["updated"]:  # the expected case for a random policy: every reward is -1
        assert line["loss"] is None and line["completion_tokens"] == 0
        assert line["sampling_rounds"] == 2  # filtering tried a refill
        # nothing trained: no "final" model that is only the initial one, and the summary says so
        assert summary["updates"] == 0 and summary["model_dir"] is None
        assert not (Path(cfg.train.out_dir) / "final").exists()
    else:
        assert (Path(summary["model_dir"]) / "model.safetensors").exists()


def _completion_logprobs(model, prompt_ids, completion):
    """fp64 log-probs of the completion tokens from the model's full logits."""
    ids = torch.cat([prompt_ids, completion])[None]
    logits = model(ids, logits_to_keep=len(completion) + 1).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(1, completion[:, None]).squeeze(1)


def _star_grpo_loss(groups, policy, reference, clip_eps, kl_coef):
    """STAR's objective on the recorded rollouts, from full fp64 logits: per completion
    token, -min(r A, clip(r, 1 - eps, 1 + eps) A) + kl_coef * 0.5 (log pi - log pi_ref)^2
    with r = pi / pi_old (pi_old = the same policy, detached), token mean over the step.
    Returns (loss, mean k2 KL)."""
    total, kl_total, count = 0.0, 0.0, 0
    for group in groups:
        for completion, advantage in zip(group.completions, group.advantages):
            logp = _completion_logprobs(policy, group.prompt_ids, completion)
            with torch.no_grad():
                ref = _completion_logprobs(reference, group.prompt_ids, completion)
            ratio = torch.exp(logp - logp.detach())
            surrogate = torch.minimum(ratio * advantage,
                                      ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
            kl = 0.5 * (logp - ref) ** 2
            total = total + (-surrogate + kl_coef * kl).sum()
            kl_total += kl.sum().item()
            count += len(completion)
    return total / count, kl_total / count


def test_step_losses_match_a_full_logits_computation(make_config, tokenizer, monkeypatch):
    """Fake rewards (see the module docstring) so that groups are kept. Step 1: the logged
    loss and pre-clip gradient norm against autograd through the fp64 full-logits
    objective (checks token alignment, advantages and the token-mean normalisation across
    micro-batches of 3); the recorded old/ref log-probs against fp64 logits. Step 2 (the
    policy moved, the reference did not): the loss and the k2 KL."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    cfg = make_config(rollout={"max_sampling_rounds": 3}, grpo={"kl_coef": 0.5},
                      train={"max_steps": 2, "save_every": 1, "keep_checkpoints": 3,
                             "lr": 1e-2})
    _, reports = _run(cfg, tokenizer)
    initial = load_model(cfg.policy.model, torch.float64, torch.device("cpu"))
    after_step1 = load_model(cfg.policy.model, torch.float64, torch.device("cpu"))
    weights = load_file(str(Path(cfg.train.out_dir) / "checkpoints/step-000001/model.safetensors"))
    after_step1.load_state_dict({k: v.double() for k, v in weights.items()})
    logs = log_lines(cfg.train.out_dir)

    for step, policy in ((1, initial), (2, after_step1)):
        kept = [g for g in reports[step - 1].detail if g.kept]
        assert kept and logs[step - 1]["updated"]
        tokens = sum(len(c) for g in kept for c in g.completions)
        assert logs[step - 1]["completion_tokens"] == tokens
        for group in kept:
            assert group.advantages == pytest.approx(group_advantages(group.rewards, 4))
            for completion, old, ref in zip(group.completions, group.old_logprobs,
                                            group.ref_logprobs):
                with torch.no_grad():
                    want_old = _completion_logprobs(policy, group.prompt_ids, completion)
                    want_ref = _completion_logprobs(initial, group.prompt_ids, completion)
                torch.testing.assert_close(old.double(), want_old, atol=2e-5, rtol=0)
                torch.testing.assert_close(ref.double(), want_ref, atol=2e-5, rtol=0)
        policy.zero_grad(set_to_none=True)
        loss, kl = _star_grpo_loss(kept, policy, initial, clip_eps=0.2, kl_coef=0.5)
        logged = logs[step - 1]
        assert logged["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
        assert logged["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-9)
        assert logged["clip_fraction"] == 0.0  # on-policy: every ratio is 1
        if step == 1:
            assert kl == 0.0 and abs(loss.item()) > 1e-4  # varied lengths: -mean(A) != 0
            loss.backward()
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in policy.parameters()
                                  if p.grad is not None))
            assert logged["grad_norm"] == pytest.approx(norm.item(), rel=1e-3)
        else:
            assert kl > 1e-4  # the KL term is really exercised


def test_dynamic_filtering_drops_constant_groups_and_draws_more(make_config, tokenizer,
                                                                 monkeypatch):
    """Fake rewards (see the module docstring): text-reference rows 2 and 5 always score
    0, so their groups are dropped and further prompts are drawn. Runs under bf16 autocast
    with gradient checkpointing (the released settings' code path)."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    cfg = make_config(rollout={"prompts_per_rollout": 3, "max_sampling_rounds": 3},
                      policy={"gradient_checkpointing": True},
                      train={"max_steps": 2, "dtype": "bfloat16", "episodes": 1})
    _, reports = _run(cfg, tokenizer)
    logs = log_lines(cfg.train.out_dir)
    stream = simrl.PromptStream(7, 1, cfg.train.seed).take(0, 7)
    position = 0
    for report, line in zip(reports, logs):
        groups = report.detail
        assert line["prompts"] == stream[position:position + line["prompts_consumed"]]
        position += line["prompts_consumed"]
        assert line["stream_position"] == position
        for group in groups:
            assert group.kept == (group.prompt_index not in TEXT_ROWS)
            assert (group.advantages is None) == (not group.kept)
            if group.kept:
                assert group.advantages == pytest.approx(group_advantages(group.rewards, 4))
                assert abs(sum(group.advantages)) < 1e-9
                assert len(group.old_logprobs) == len(group.completions)
        kept = [g for g in groups if g.kept]
        assert line["kept_prompts"] == [g.prompt_index for g in kept]
        assert line["groups_kept"] == len(kept) == 3 or position == 7
        assert line["prompts_consumed"] == 3 + sum(g.prompt_index in TEXT_ROWS for g in groups) \
            or position == 7
        assert line["completion_tokens"] == sum(len(c) for g in kept for c in g.completions)
        assert line["kept_fraction"] == pytest.approx(len(kept) / len(groups))
        assert line["loss"] is not None and line["grad_norm"] > 0
    assert any(line["prompts_consumed"] > 3 for line in logs)  # a refill really happened


def test_interrupted_run_resumes_exactly(make_config, tokenizer, monkeypatch):
    """Killed after step 3 (checkpoint at 2), then restarted: bitwise the same weights and
    the same log as an uninterrupted run. Fake rewards (see the module docstring) so that
    updates happen and filtering moves the stream by a variable amount."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    straight = make_config(out="straight", train={"max_steps": 4, "save_every": 2, "lr": 1e-3})
    _run(straight, tokenizer)

    cfg = make_config(out="resumed", train={"max_steps": 4, "save_every": 2, "lr": 1e-3})

    def crash(step, report):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simrl.run_simrl(cfg, tokenizer=tokenizer, on_step_end=crash, log=lambda *_: None)
    assert [line["step"] for line in log_lines(cfg.train.out_dir)] == [1, 2, 3]
    summary, _ = _run(cfg, tokenizer)
    assert summary["start_step"] == 2 and summary["steps"] == 4

    def without_time(lines):
        return [{k: v for k, v in line.items() if k not in ("seconds", "tokens_per_s")}
                for line in lines]

    a, b = without_time(log_lines(straight.train.out_dir)), without_time(log_lines(cfg.train.out_dir))
    assert [x["step"] for x in b] == [1, 2, 3, 4] and a == b
    assert any(x["prompts_consumed"] > 2 for x in b) and all(x["updated"] for x in b)
    wa = load_file(str(Path(straight.train.out_dir) / "final/model.safetensors"))
    wb = load_file(str(Path(cfg.train.out_dir) / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    initial = load_model(cfg.policy.model, torch.float32, torch.device("cpu")).state_dict()
    assert any(not torch.equal(initial[n], w) for n, w in wb.items())  # training moved them


def test_resume_with_other_data_settings_is_refused(make_config, tokenizer):
    cfg = make_config(out="run", train={"max_steps": 1, "save_every": 1})
    _run(cfg, tokenizer)
    other_seed = make_config(out="run", train={"max_steps": 2, "save_every": 1, "seed": 2})
    with pytest.raises(ValueError, match=r"seed: 1 -> 2"):
        _run(other_seed, tokenizer)


# --- the released batching: PPO mini-batches of one rollout ------------------------------

def _minibatch_config(make_config, out, **train):
    return make_config(out=out, rollout={"max_sampling_rounds": 3},
                       train={"samples_per_step": 3, "max_epochs": 2, "lr": 1e-2, **train})


def test_minibatches_use_the_log_probs_recorded_at_sampling(make_config, tokenizer,
                                                             monkeypatch):
    """A rollout of 2 groups x 4 completions feeds ceil(8 / 3) x 2 epochs = 6 steps; every
    kept completion is trained once per epoch; the recorded old and reference log-probs are
    the initial policy's; step 2's loss is the fp64 objective of the policy after step 1
    with the ratio taken against the recorded (sampling-time) log-probs."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    one = _minibatch_config(make_config, "one", max_steps=1)
    _run(one, tokenizer)
    cfg = _minibatch_config(make_config, "two", max_steps=6)
    _, reports = _run(cfg, tokenizer)
    logs = log_lines(cfg.train.out_dir)
    assert [line["rollout"] for line in logs] == [0] * 6
    assert "reward_mean" in logs[0] and "reward_mean" not in logs[1]
    kept = [g for g in reports[0].detail if g.kept]
    samples = [(g, c, a, old, ref) for g in kept for c, a, old, ref in
               zip(g.completions, g.advantages, g.old_logprobs, g.ref_logprobs)]
    assert len(samples) == 8 and [len(line["samples"]) for line in logs] == [3, 3, 2] * 2
    for epoch in (logs[:3], logs[3:]):
        assert sorted(i for line in epoch for i in line["samples"]) == list(range(8))

    initial = load_model(cfg.policy.model, torch.float64, torch.device("cpu"))
    for group, completion, _, old, ref in samples:
        with torch.no_grad():
            want = _completion_logprobs(initial, group.prompt_ids, completion)
        torch.testing.assert_close(old.double(), want, atol=2e-5, rtol=0)
        torch.testing.assert_close(ref.double(), want, atol=2e-5, rtol=0)

    after_step1 = load_model(ModelSpec(path=str(Path(one.train.out_dir) / "final")),
                             torch.float64, torch.device("cpu"))
    part = [samples[i] for i in logs[1]["samples"]]
    micro_means = []
    for first in range(0, len(part), 3):  # micro_batch_size 3: one micro-batch here
        terms, count = 0.0, 0
        for group, completion, advantage, old, ref in part[first:first + 3]:
            with torch.no_grad():
                logp = _completion_logprobs(after_step1, group.prompt_ids, completion)
            ratio = torch.exp(logp - old.double())
            surrogate = torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
            terms += (-surrogate + 1e-3 * 0.5 * (logp - ref.double()) ** 2).sum().item()
            count += len(completion)
        micro_means.append(terms / count)
    assert logs[1]["loss"] == pytest.approx(sum(micro_means) / len(micro_means), rel=1e-4,
                                            abs=1e-6)
    assert logs[1]["clip_fraction"] is not None


def test_minibatched_run_resumes_exactly_from_a_rollout_boundary(make_config, tokenizer,
                                                                  monkeypatch):
    """Checkpoints wait for the end of a rollout (2 steps each here): killed after step 3,
    the run resumes from step 2 and ends with the uninterrupted run's weights and log."""
    monkeypatch.setattr(sampling, "similarity_reward", fake_reward)
    train = {"samples_per_step": 4, "max_epochs": 1, "max_steps": 4, "save_every": 1,
             "lr": 1e-3}
    straight = make_config(out="straight", train=train)
    _run(straight, tokenizer)
    cfg = make_config(out="resumed", train=train)

    def crash(step, report):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simrl.run_simrl(cfg, tokenizer=tokenizer, on_step_end=crash, log=lambda *_: None)
    assert sorted(p.name for p in (Path(cfg.train.out_dir) / "checkpoints").iterdir()) \
        == ["step-000002"]  # not step 1 or 3: inside a rollout
    summary, _ = _run(cfg, tokenizer)
    assert summary["start_step"] == 2 and summary["steps"] == 4

    def without_time(lines):
        return [{k: v for k, v in line.items() if k not in ("seconds", "tokens_per_s")}
                for line in lines]

    assert without_time(log_lines(straight.train.out_dir)) == without_time(
        log_lines(cfg.train.out_dir))
    wa = load_file(str(Path(straight.train.out_dir) / "final/model.safetensors"))
    wb = load_file(str(Path(cfg.train.out_dir) / "final/model.safetensors"))
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
