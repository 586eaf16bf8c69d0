"""Prompt types, as vLLM's ``vllm.inputs`` (re-exported there as plexus.inputs)."""
from typing import TypedDict, Union

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    prompt: str
    multi_modal_data: NotRequired[dict]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[dict]


PromptType = Union[str, TextPrompt, TokensPrompt]
