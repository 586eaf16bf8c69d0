"""/tokenize and /detokenize (vLLM's extra endpoints): a prompt or chat messages -> token ids, and back."""
from __future__ import annotations

from plexus.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest
from plexus.entrypoints.openai.serving_engine import OpenAIError, ServingBase


class TokenizationEndpoints(ServingBase):
    def tokenize(self, request: TokenizeRequest) -> dict:
        self.lora_for(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("give either prompt or messages", 400, "prompt")
        if request.messages is not None:
            text = self.render_chat(request.messages, request.add_generation_prompt, request.continue_final_message,
                                    request.chat_template, request.chat_template_kwargs)
            ids = self._encode(text, bool(request.add_special_tokens))
        else:
            ids = self._encode(request.prompt, True if request.add_special_tokens is None
                               else request.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, request: DetokenizeRequest) -> dict:
        self.lora_for(request.model)
        if self.tokenizer is None:
            raise OpenAIError("detokenize needs a tokenizer", 400)
        vocab = self.config.model.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(f"token id {bad} is out of vocabulary: ids must be in [0, {vocab})", 400, "tokens")
        return {"prompt": self.tokenizer.decode(request.tokens)}
