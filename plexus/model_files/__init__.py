"""A model's files: where they are (local paths, the bundled model, GGUF files converted into Hugging Face
directories) and what config.json and generation_config.json say. Plain file handling, no torch modules:
the engine's configuration step and the model loader both read it."""
from plexus.model_files.gguf import bundled_gguf_path, runs_natively_by_default
from plexus.model_files.hf_config import checkpoint_dtype, load_config, load_generation_config, text_model_config
from plexus.model_files.resolve import (
    BUNDLED_MODEL_NAME, HubOptions, from_hub, resolve_model_dir, resolve_tokenizer_dir)

__all__ = ["BUNDLED_MODEL_NAME", "HubOptions", "bundled_gguf_path", "checkpoint_dtype", "from_hub", "load_config", "load_generation_config",
           "resolve_model_dir", "resolve_tokenizer_dir", "runs_natively_by_default", "text_model_config"]
