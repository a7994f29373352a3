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
