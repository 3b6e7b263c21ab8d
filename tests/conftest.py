"""Shared fixtures: the real bundled model (loaded once per run), real text, tiny models."""

from __future__ import annotations

import copy
import os

from wq.threads import configure_openmp

configure_openmp()  # before torch loads (see wq/threads.py): a shared, busy machine costs 10x otherwise

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter without a GPU. The flag is read when a kernel module is
    # first imported, by whichever test gets there first, so set it once for the whole session.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    from wq.assets import resolve_model

    return resolve_model(None)  # converted from the GGUF once per machine, then cached


@pytest.fixture(scope="session")
def _real_model_pristine(real_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.bfloat16).eval()


@pytest.fixture
def real_model(_real_model_pristine):
    """A fresh copy of the real model (bf16) that a test may quantize in place."""
    return copy.deepcopy(_real_model_pristine)


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="session")
def pride_text() -> str:
    from wq.assets import load_book

    return load_book("prideprejudice")


def make_tiny_llama(hidden: int = 64, layers: int = 2, inter: int = 160, vocab: int = 256, seed: int = 0,
                    tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


@pytest.fixture(autouse=True)
def _pin_reference_kernel(request, monkeypatch):
    """Contract: tests that compare logits run on the reference kernel. On CPU, dispatch now picks fast
    kernels (bf16 or reordered fp32 sums); test files about kernels opt out with `pytest.mark.kernels`."""
    if request.node.get_closest_marker("kernels") is None:
        monkeypatch.setenv("WQ_KERNEL", "reference")
