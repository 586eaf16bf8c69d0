"""Shared, expensive fixtures: the bundled model is converted, loaded by HF
(the outside truth) and by plexus once per test session."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm_dir():
    from plexus.model_files import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def hf_smollm():
    """SmolLM2 as transformers loads it from the GGUF file itself, in fp32."""
    from transformers import AutoModelForCausalLM

    from plexus.model_files.gguf import bundled_gguf_path

    path = bundled_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def llm_fp32():
    """One fp32 plexus engine on the bundled model, shared by tests that don't need special settings."""
    from plexus import LLM

    return LLM(dtype="float32", max_model_len=1024, kv_cache_space=0.25)
