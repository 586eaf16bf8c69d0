"""`plexus serve`'s command line (vLLM's cli_args.py): the server's own flags, every engine setting as a flag
(EngineArgs.add_cli_args), and their checks, all before the model loads."""
from __future__ import annotations

import argparse
import dataclasses

from plexus.core.arg_utils import EngineArgs
from plexus.entrypoints.openai.serving import LoRAModule

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclasses.dataclass
class ServerSettings:
    """What the server adds to EngineArgs (vLLM's server flags)."""
    host: str | None = None
    port: int = 8000
    api_key: str | None = None
    lora_modules: list[str] = dataclasses.field(default_factory=list)
    chat_template: str | None = None
    response_role: str = "assistant"
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    enable_log_requests: bool = False
    max_num_queued_requests: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    return_tokens_as_token_ids: bool = False
    allow_runtime_lora_updating: bool = False



def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="HF model directory, .gguf file or hub id (default: the bundled SmolLM2-135M-Instruct)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=None, help="host to bind (default: all interfaces)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $VLLM_API_KEY or "
                             "$PLEXUS_API_KEY; none: open)")
    server.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="LoRA adapters to serve as models: name=path, or JSON {\"name\", \"path\", "
                             "\"base_model_name\"}")
    server.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or the path of a file holding one (default: the tokenizer's)")
    server.add_argument("--response-role", default="assistant")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["debug", "info", "warning", "error", "critical", "trace"])
    server.add_argument("--disable-uvicorn-access-log", action="store_true")
    server.add_argument("--enable-log-requests", action="store_true", help="log each request as it arrives")
    server.add_argument("--disable-log-requests", action="store_true",
                        help="vLLM's older flag; requests are not logged unless --enable-log-requests")
    server.add_argument("--max-num-queued-requests", type=int, default=None,
                        help="answer 503 to new requests while this many are waiting to be scheduled "
                             "(default: no limit)")
    server.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"answer 413 to larger request bodies (default {DEFAULT_MAX_BODY_BYTES})")
    server.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="logprobs name tokens as 'token_id:N' instead of their text")
    EngineArgs.add_cli_args(parser)
    return parser


def make_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from plexus.entrypoints.arg_parser import FlexibleArgumentParser

    parser = parser or FlexibleArgumentParser(prog="plexus serve",
                                              description="vLLM's OpenAI-compatible server, on plexus")
    return add_server_args(parser)


def settings_from_args(args: argparse.Namespace, environ: dict | None = None) -> ServerSettings:
    from plexus.envs import server_environment

    env = server_environment(environ)
    chat_template = args.chat_template
    if chat_template is not None and "{" not in chat_template:
        try:
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        except OSError as e:
            raise ValueError(f"--chat-template {args.chat_template!r}: not a template and not a readable file "
                             f"({e.strerror})") from None
    if args.max_num_queued_requests is not None and args.max_num_queued_requests < 0:
        raise ValueError(f"--max-num-queued-requests must be >= 0, got {args.max_num_queued_requests}")
    if args.max_request_body_bytes < 1024:
        raise ValueError(f"--max-request-body-bytes must be at least 1024, got {args.max_request_body_bytes}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for module in args.lora_modules:
        LoRAModule.parse(module)            # a malformed entry fails before the model loads
    return ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key or env.api_key, lora_modules=list(args.lora_modules),
        chat_template=chat_template, response_role=args.response_role, uvicorn_log_level=args.uvicorn_log_level,
        disable_uvicorn_access_log=args.disable_uvicorn_access_log, enable_log_requests=args.enable_log_requests,
        max_num_queued_requests=args.max_num_queued_requests, max_request_body_bytes=args.max_request_body_bytes,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        allow_runtime_lora_updating=env.allow_runtime_lora_updating)


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    engine_args = EngineArgs.from_cli_args(args)
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        engine_args.model = args.model_tag
    if args.lora_modules and not engine_args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    return engine_args
