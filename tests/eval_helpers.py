"""Shared models for the eval tests. Each builder is cached per process, so a fixture imported by several
test modules still loads or builds its model once."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch


@functools.lru_cache(maxsize=1)
def _default_dir() -> str:
    from wq.assets import resolve_model

    return resolve_model(None)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_default_dir())


@functools.lru_cache(maxsize=1)
def _real_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_default_dir(), dtype=torch.float32).eval()


def tiny_llama(seed: int = 0, vocab_size: int | None = None):
    """A 2-block Llama with SmolLM2's vocabulary (random weights), built in the test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size or len(_tokenizer()), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=1)
def _tiny_dir() -> str:
    d = Path(tempfile.mkdtemp(prefix="wq-eval-tiny-"))
    tiny_llama().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return str(d)


@functools.lru_cache(maxsize=4)
def _tiny_quant_dir(scheme: str) -> str:
    from transformers import AutoModelForCausalLM

    import wq

    model = AutoModelForCausalLM.from_pretrained(_tiny_dir(), dtype=torch.float32)
    wq.quantize_model(model, scheme, progress=False)
    d = Path(tempfile.mkdtemp(prefix=f"wq-eval-{scheme}-")) / scheme
    wq.save(model, d, tokenizer=_tokenizer())
    return str(d)


@pytest.fixture(scope="session")
def default_dir():
    return _default_dir()


@pytest.fixture(scope="session")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def real_model_fp32():
    return _real_model()


@pytest.fixture(scope="session")
def tiny_dir():
    return _tiny_dir()


@pytest.fixture(scope="session")
def tiny_w4_dir():
    return _tiny_quant_dir("W4G32")
