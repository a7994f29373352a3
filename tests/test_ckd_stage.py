"""The CKD stage: config, batch schedule, teacher cache, training loop and exact resume."""

import json
from pathlib import Path

import pytest
import torch

from star_train import teacher_cache as tc
from star_train.ckd import run_ckd
from star_train.config import (config_from_dict, load_config, load_rollout_config,
                               load_simrl_config)
from star_train.examples import collate, fingerprint, load_examples, target_hidden
from star_train.models import load_model
from star_train.schedule import BatchSchedule

VOCAB = 151_936  # Qwen3's padded embedding size: the real tokenizer's ids must fit


def _tiny(hidden, seed):
    return {"config": {"vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                       "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "head_dim": hidden // 2,
                       "max_position_embeddings": 512, "tie_word_embeddings": False},
            "seed": seed}


def _records():
    weather = {"name": "get_weather", "description": "Current weather for a city.",
               "parameters": {"type": "object", "properties": {
                   "city": {"type": "string", "description": "City name"},
                   "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}
    add = {"name": "add", "description": "Add two integers.",
           "parameters": {"a": {"type": "int"}, "b": {"type": "int"}}}
    rows = []
    for i in range(7):
        city = ["Paris", "Lima", "Oslo", "Pune", "Kyiv", "Doha", "Bern"][i]
        if i % 3 == 2:
            last = {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}
        else:
            last = {"role": "assistant", "content": None, "reasoning_content": f"Weather in {city}.",
                    "tool_calls": [{"name": "get_weather", "arguments": {"city": city}}]}
        rows.append({"id": f"row-{i}", "tools": [weather, add], "messages": [
            {"role": "user", "content": f"What is the weather in {city}? Also {i} + {i + 1}?"},
            last]})
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    from star_train.tokenizer import qwen3_tokenizer
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Qwen3 with a sharpened head (a random init is near-uniform), saved
    as a local Hugging Face folder: the teacher loads through the path route."""
    spec = config_from_dict({"data": {"path": "x"}, "teacher": {"model": _tiny(48, 1)},
                             "student": {"model": {"path": "s"}}}).teacher.model
    teacher = load_model(spec, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(path)
    return str(path)


@pytest.fixture
def run_config(tmp_path, teacher_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return lambda **train: config_from_dict({
        "data": {"path": str(data), "max_length": 160},
        "teacher": {"model": {"path": teacher_dir}, "k": 8, "batch_size": 3, "shard_size": 3},
        "student": {"model": _tiny(32, 2), "gradient_checkpointing": False},
        "ckd": {"student_topm": 8},
        "train": {"out_dir": str(tmp_path / "run"), "lr": 1e-3, "batch_size": 2,
                  "micro_batch_size": 1, "dtype": "float32", "device": "cpu",
                  "save_every": 2, "seed": 3, **train}})


# --- config --------------------------------------------------------------------------

def test_config_file_relative_paths_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\npath = "d.jsonl"\n[teacher.model]\npath = "teacher"\n'
                    '[student.model.config]\nhidden_size = 8\n[train]\nlr = 1e-5\n')
    cfg = load_config(path, {"train.batch_size": 8, "train.micro_batch_size": 2})
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.teacher.model.path == str(tmp_path / "teacher")
    assert cfg.student.model.config == {"hidden_size": 8}
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (1e-5, 8, 1)
    assert (cfg.ckd.tail_coef, cfg.ckd.student_topm, cfg.teacher.k) == (10.0, 100, 100)


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.toml"))
    loaders = {"ckd": load_config, "simrl": load_simrl_config, "rollouts": load_rollout_config}
    assert {p.name.split("-")[0] for p in paths} == set(loaders)
    for path in paths:
        cfg = loaders[path.name.split("-")[0]](path)
        out_dir = cfg.output.out_dir if hasattr(cfg, "output") else cfg.train.out_dir
        assert Path(out_dir).is_absolute() and ".." not in Path(cfg.data.path).parts


@pytest.mark.parametrize("values, match", [
    ({"trian": {}}, "trian"),
    ({"train": {"learning_rate": 1}}, "learning_rate"),
    ({"train": {"batch_size": 6, "micro_batch_size": 4}}, "micro_batch_size"),
    ({"train": {"micro_batch_size": 0}}, "micro_batch_size must be >= 1"),
    ({"ckd": {"kd_ratio": 1.5}}, "kd_ratio"),
    ({"train": {"dtype": "float16"}}, "train.dtype"),
    ({"teacher": {"model": {}}}, "teacher.model"),
    ({"teacher": {"k": 0}}, "teacher.k"),
    ({"train": {"log_every": 0}}, "train.log_every"),
    ({"train": {"weight_decay": -1e-4}}, "train.weight_decay"),
])
def test_config_errors_name_the_key(values, match):
    base = {"data": {"path": "x.jsonl"}, "teacher": {"model": {"path": "t"}},
            "student": {"model": {"path": "s"}}}
    for section, table in values.items():
        base[section] = {**base.get(section, {}), **table}
    with pytest.raises(ValueError, match=match):
        config_from_dict(base)


# --- schedule --------------------------------------------------------------------------

def test_schedule_covers_each_epoch_once_and_is_deterministic():
    s = BatchSchedule(num_examples=7, batch_size=3, epochs=3, seed=5)
    assert s.total_steps == 7
    stream = [i for step in range(s.total_steps) for i in s.batch(step)]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    assert stream[:7] != stream[7:14]  # a fresh permutation per epoch
    again = BatchSchedule(7, 3, 3, seed=5)
    assert [again.batch(st) for st in (6, 0, 3)] == [s.batch(st) for st in (6, 0, 3)]
    with pytest.raises(IndexError, match="step 7"):
        s.batch(7)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSchedule(2, 5, 1, 0)


# --- teacher cache ---------------------------------------------------------------------------

def test_teacher_cache_is_the_full_logits_top_k(run_config, tokenizer, tmp_path):
    cfg = run_config()
    examples = load_examples(cfg.data, tokenizer)
    assert all(ex.num_targets > 0 for ex in examples)
    teacher = load_model(cfg.teacher.model, torch.float32, torch.device("cpu"))
    directory = tmp_path / "cache"
    tc.build_teacher_cache(teacher, examples, directory, k=5, batch_size=2, shard_size=3,
                           fingerprint=fingerprint(examples), teacher_name="t",
                           pad_id=tokenizer.pad_token_id)
    cache = tc.TeacherCache(directory, fingerprint=fingerprint(examples))
    assert len(cache) == len(examples) and cache.k == 5
    for ex in examples:
        with torch.no_grad():  # independent ground truth: the model's own full logits, fp64
            logits = teacher(ex.input_ids[None].long()).logits[0].double()
        full = logits.log_softmax(-1)[:-1][ex.target_mask[1:]]
        want_logprobs, want_ids = full.topk(5, dim=-1)
        ids, logprobs = cache[ex.index]
        assert ids.shape == (ex.num_targets, 5) == (cache.num_targets(ex.index), 5)
        torch.testing.assert_close(ids, want_ids)
        torch.testing.assert_close(logprobs.double(), want_logprobs, atol=2e-5, rtol=0)


def test_teacher_cache_resumes_missing_shards_and_rejects_other_settings(run_config, tokenizer,
                                                                         tmp_path, monkeypatch):
    cfg = run_config()
    examples = load_examples(cfg.data, tokenizer)
    teacher = load_model(cfg.teacher.model, torch.float32, torch.device("cpu"))
    kwargs = dict(k=4, batch_size=2, shard_size=3, fingerprint=fingerprint(examples),
                  teacher_name="t", pad_id=tokenizer.pad_token_id)
    directory = tmp_path / "cache"
    tc.build_teacher_cache(teacher, examples, directory, **kwargs)
    before = tc.TeacherCache(directory)
    expected = [before[i] for i in range(len(examples))]
    del before
    (directory / "shard-00001.safetensors").unlink()  # as if killed while writing shard 1
    assert not tc.cache_is_complete(directory)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        tc.TeacherCache(directory)
    seen = []
    real = tc.collate
    monkeypatch.setattr(tc, "collate", lambda group, pad: seen.extend(e.index for e in group)
                        or real(group, pad))
    tc.build_teacher_cache(teacher, examples, directory, **kwargs)
    assert seen == [3, 4, 5]  # only the missing shard was recomputed
    after = tc.TeacherCache(directory)
    for i, (ids, logprobs) in enumerate(expected):
        assert torch.equal(after[i][0], ids) and torch.equal(after[i][1], logprobs)
    with pytest.raises(ValueError, match="k: 4 -> 6"):
        tc.build_teacher_cache(teacher, examples, directory, **{**kwargs, "k": 6})
    with pytest.raises(ValueError, match="other examples"):
        tc.TeacherCache(directory, fingerprint="something else")


# --- training ---------------------------------------------------------------------------------

def _weights(model_dir):
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def _log_lines(cfg):
    path = cfg.train.out_dir + "/train_log.jsonl"
    return [json.loads(line) for line in open(path)]


def test_first_step_loss_is_the_full_logits_ckd(run_config, tokenizer):
    """The logged loss of step 1 (before any update) against the CKD formula evaluated on
    the student's and teacher's full logits: checks target alignment end to end."""
    cfg = run_config(max_steps=1, batch_size=2, micro_batch_size=1)
    run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    logged = _log_lines(cfg)[0]
    examples = load_examples(cfg.data, tokenizer)
    teacher = load_model(cfg.teacher.model, torch.float32, torch.device("cpu"))
    student = load_model(cfg.student.model, torch.float32, torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in logged["examples"]:
            ex = examples[i]
            sel = ex.target_mask[1:]
            p = teacher(ex.input_ids[None].long()).logits[0, :-1][sel].double().log_softmax(-1)
            q = student(ex.input_ids[None].long()).logits[0, :-1][sel].double().log_softmax(-1)
            t_logp, t_ids = p.topk(8, dim=-1)
            fkl = (t_logp.exp() * (t_logp - q.gather(1, t_ids))).sum(-1)
            s_ids = q.topk(8, dim=-1).indices
            mistakes = ~(s_ids[:, :, None] == t_ids[:, None, :]).any(-1)
            penalty = (q.gather(1, s_ids).exp() * mistakes).sum(-1)
            total += (fkl + 10.0 * penalty).sum().item()
            count += sel.sum().item()
    assert logged["tokens"] == count
    assert logged["loss"] == pytest.approx(total / count, rel=1e-4)


def test_interrupted_run_resumes_exactly(run_config, tokenizer):
    """Killed after step 3 (checkpoint at 2), then restarted: the same weights and the same
    per-step examples as an uninterrupted run, each example once per epoch."""
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    straight = run_config(epochs=2, out_dir=run_config().train.out_dir + "-straight")
    run_ckd(straight, **quiet)

    cfg = run_config(epochs=2)

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ckd(cfg, on_step_end=crash, **quiet)
    assert [line["step"] for line in _log_lines(cfg)] == [1, 2, 3]
    summary = run_ckd(cfg, **quiet)
    assert summary["start_step"] == 2 and summary["steps"] == 7

    a, b = _log_lines(straight), _log_lines(cfg)
    assert [x["step"] for x in b] == list(range(1, 8))
    assert [x["examples"] for x in a] == [x["examples"] for x in b]
    stream = [i for x in b for i in x["examples"]]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:]) == list(range(7))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
    wa = _weights(Path(straight.train.out_dir) / "final")
    wb = _weights(Path(cfg.train.out_dir) / "final")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    initial = load_model(cfg.student.model, torch.float32, torch.device("cpu")).state_dict()
    assert any(not torch.equal(initial[n], w) for n, w in wb.items())  # training moved them


def test_training_lowers_the_loss(run_config, tokenizer):
    cfg = run_config(epochs=3, lr=1e-2, save_every=100)
    run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    losses = [x["loss"] for x in _log_lines(cfg)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first


def test_collate_and_target_rows(tokenizer, run_config):
    examples = load_examples(run_config().data, tokenizer)[:3]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in examples)
    hidden = torch.arange(batch["input_ids"].numel(), dtype=torch.float32).view(
        *batch["input_ids"].shape, 1)
    rows = target_hidden(hidden, batch["target_mask"])
    assert rows.shape[0] == sum(e.num_targets for e in examples)
    first = examples[0]
    want = (first.target_mask.nonzero().squeeze(1) - 1).float()  # hidden at t-1 predicts t
    torch.testing.assert_close(rows[:first.num_targets, 0], want)


def test_rerun_with_another_teacher_k_does_not_reuse_the_complete_cache(run_config, tokenizer):
    """The cache in out_dir was built with k=8; a rerun of the same out_dir with k=6 (or
    another teacher) must not silently train on the old top-8 cache."""
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    run_ckd(run_config(max_steps=1), **quiet)
    cfg = run_config(max_steps=2)
    cfg.teacher.k = 6
    with pytest.raises(ValueError, match="k: 8 -> 6"):
        run_ckd(cfg, **quiet)
    other = run_config(max_steps=2)
    other.teacher.model.path = other.teacher.model.path + "-copy"
    with pytest.raises(ValueError, match="teacher"):
        run_ckd(other, **quiet)


def test_teacher_is_freed_before_the_student_is_loaded(run_config, tokenizer, monkeypatch):
    """``del teacher`` frees nothing while a reference cycle still reaches the teacher: in
    a fresh process the first model load runs transformers' lazy import, whose traceback
    frames keep ``load_model``'s frame (and so the teacher) in a garbage cycle that only
    a full GC collects (seen with gc disabled: the teacher was alive when the student
    loaded). Modelled here with an explicit cycle; an 8B teacher left on the device
    beside the student is 16 GB."""
    import gc
    import weakref

    from star_train import ckd

    loaded, alive_at_student = [], []
    real = ckd.load_model

    def tracking(spec, dtype, device):
        if loaded:  # the second load is the student
            alive_at_student.append(loaded[0]() is not None)
        model = real(spec, dtype, device)
        if not loaded:
            cycle = {"model": model}
            cycle["self"] = cycle  # garbage as soon as the stage drops the teacher
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(ckd, "load_model", tracking)
    was_enabled = gc.isenabled()
    gc.disable()  # make "the GC did not happen to run" deterministic
    try:
        run_ckd(run_config(max_steps=1), tokenizer=tokenizer, log=lambda *_: None)
    finally:
        if was_enabled:
            gc.enable()
    assert alive_at_student == [False]


def test_resume_with_other_data_settings_is_refused(run_config, tokenizer):
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    run_ckd(run_config(max_steps=2), **quiet)
    with pytest.raises(ValueError, match=r"batch_size: 2 -> 1"):
        run_ckd(run_config(max_steps=3, batch_size=1, micro_batch_size=1), **quiet)


def test_bf16_autocast_hands_the_fused_op_bf16(run_config, tokenizer, monkeypatch):
    """Under autocast the trunk's output stays fp32 (fp32 residual stream); the stage must
    still run the fused lm_head work in bf16."""
    import star_kernels as sk
    from star_train import ckd

    seen = []
    real = sk.fused_linear_ckd_loss

    def spy(rows, weight, *args, **kwargs):
        seen.append((rows.dtype, weight.dtype))
        return real(rows, weight, *args, **kwargs)

    monkeypatch.setattr(ckd.sk, "fused_linear_ckd_loss", spy)
    run_ckd(run_config(max_steps=1, dtype="bfloat16"), tokenizer=tokenizer, log=lambda *_: None)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}


def test_answers_end_at_im_end_and_long_answers_are_skipped(run_config, tokenizer):
    cfg = run_config()
    examples = load_examples(cfg.data, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(int(ex.input_ids[-1]) == im_end == int(ex.labels[-1]) for ex in examples)
    lengths = sorted(int((ex.labels != -100).sum()) for ex in examples)
    cfg.data.max_length = lengths[2]  # the answers of this length or longer no longer fit
    logged = []
    kept = load_examples(cfg.data, tokenizer, log=logged.append)
    assert len(kept) == sum(n < lengths[2] for n in lengths) < len(examples)
    assert [ex.index for ex in kept] == list(range(len(kept)))
    assert logged and "exceeds data.max_length" in logged[0]
