"""Where a model's files are.

A model is always served from a local Hugging Face directory (config.json,
safetensors weights, tokenizer files). `model` may name one directly, a .gguf
file (converted into such a directory by `plexus.model_files.gguf`, as the
bundled SmolLM2-135M-Instruct is), or a Hugging Face hub id, which resolves as
vLLM resolves it, through huggingface_hub: the local cache first, then a
download of only the files the engine reads (unless HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

from plexus.model_files.gguf import bundled_gguf_path, convert_gguf

BUNDLED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BUNDLED_ALIASES = {BUNDLED_MODEL_NAME, BUNDLED_MODEL_NAME.split("/")[-1]}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

# What the engine reads of a hub repository: configs, safetensors weights, tokenizer files, chat templates.
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]
TOKENIZER_FILES = ["*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]


@dataclass(frozen=True)
class HubOptions:
    cache_dir: pathlib.Path       # huggingface_hub's cache (download_dir, else $HF_HUB_CACHE / $HF_HOME/hub)
    offline: bool = False         # HF_HUB_OFFLINE
    token: bool | str | None = None   # hf_token: huggingface_hub's token argument (None: its own default)


def resolve_model_dir(model: str | None, cache_root: pathlib.Path | None = None, hub: HubOptions | None = None,
                      revision: str | None = None, quantization: str | None = None) -> pathlib.Path:
    """The local Hugging Face directory to serve `model` from. An existing path wins over the bundled name,
    which wins over the hub. cache_root: where GGUF conversions go (default $PLEXUS_CACHE_DIR).
    quantization: the user's quantization=; "gguf" converts a GGUF file keeping its quantized blocks."""
    quantized = quantization == "gguf"
    if model is None:
        return convert_gguf(bundled_gguf_path(), cache_root, quantized)
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return _resolve_dir(path, cache_root, quantized)
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path, cache_root, quantized)
        raise ValueError(
            f"model {model!r} is a file but not a .gguf file; pass a model directory "
            "(config.json + safetensors) or a .gguf file"
        )
    if str(model) in _BUNDLED_ALIASES and revision is None:
        return convert_gguf(bundled_gguf_path(), cache_root, quantized)
    return from_hub("model", str(model), hub, revision, MODEL_FILES)


def resolve_tokenizer_dir(tokenizer: str, hub: HubOptions | None, revision: str | None = None) -> pathlib.Path:
    path = pathlib.Path(tokenizer).expanduser()
    if path.exists():
        return path
    return from_hub("tokenizer", tokenizer, hub, revision, TOKENIZER_FILES)


def from_hub(what: str, repo_id: str, hub: HubOptions | None, revision: str | None,
             patterns: list[str]) -> pathlib.Path:
    """The snapshot directory of a hub repository: from the local cache if it is there, else downloaded
    (with huggingface_hub's progress bar). Errors say what was tried."""
    local = ("no such file or directory; pass a local model directory (config.json + safetensors), a .gguf "
             f"file, {BUNDLED_MODEL_NAME!r} for the bundled model, or a Hugging Face hub id")
    if hub is None or not _HUB_ID.match(repo_id) or repo_id.count("/") > 1:
        raise ValueError(f"{what} {repo_id!r}: {local}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    at = f" at revision {revision!r}" if revision else ""
    try:
        return pathlib.Path(snapshot_download(repo_id, revision=revision, cache_dir=hub.cache_dir,
                                              allow_patterns=patterns, local_files_only=True, token=hub.token))
    except (HFValidationError, OSError, ValueError) as error:
        cached = f"not in the Hugging Face cache {hub.cache_dir}{at} ({type(error).__name__})"
    if hub.offline:
        raise ValueError(f"{what} {repo_id!r}: not a local path, and {cached}; HF_HUB_OFFLINE=1 forbids "
                         "downloading it (unset it, or point HF_HOME / download_dir at a cache that has it)")
    try:
        return pathlib.Path(snapshot_download(repo_id, revision=revision, cache_dir=hub.cache_dir,
                                              allow_patterns=patterns, token=hub.token))
    except Exception as error:  # noqa: BLE001  (network, auth, missing repo: all end in one message)
        raise ValueError(f"{what} {repo_id!r}: not a local path, {cached}, and downloading it from the Hugging "
                         f"Face hub failed: {type(error).__name__}: {str(error).splitlines()[0]}") from None


def _resolve_dir(path: pathlib.Path, cache_root: pathlib.Path | None, quantized: bool = False) -> pathlib.Path:
    if (path / "config.json").is_file():
        return path
    gguf_files = sorted(path.glob("*.gguf"))
    if len(gguf_files) == 1:
        return convert_gguf(gguf_files[0], cache_root, quantized)
    if len(gguf_files) > 1:
        names = ", ".join(f.name for f in gguf_files)
        raise ValueError(
            f"model directory {path} has no config.json and several .gguf files ({names}); "
            "pass the .gguf file to use"
        )
    raise ValueError(missing_config_message(path))


def missing_config_message(path: pathlib.Path) -> str:
    return f"model directory {path} has no config.json (config.json is missing)"
