"""The OpenAI endpoints of one served model: the shared logic (serving_engine.py) with the completion, chat
and tokenization endpoints (vLLM's serving_*.py split)."""
from __future__ import annotations

from plexus.entrypoints.openai.serving_chat import ChatEndpoints
from plexus.entrypoints.openai.serving_completion import CompletionEndpoints
from plexus.entrypoints.openai.serving_engine import LoRAModule, OpenAIError, error_body
from plexus.entrypoints.openai.serving_tokenization import TokenizationEndpoints

__all__ = ["LoRAModule", "OpenAIError", "OpenAIServing", "error_body"]


class OpenAIServing(CompletionEndpoints, ChatEndpoints, TokenizationEndpoints):
    """The endpoints of one served model (and its LoRA modules), over one AsyncLLM."""
