"""`plexus serve`: vLLM's OpenAI-compatible HTTP server on fastapi + uvicorn, over one AsyncLLM.

    plexus serve [MODEL] --port 8000 --api-key KEY --lora-modules name=path ...
    python -m plexus.entrypoints.openai.api_server --model MODEL       (vLLM's module form)
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from plexus.core.arg_utils import EngineArgs
from plexus.core.async_engine import AsyncLLM, EngineDeadError
from plexus.entrypoints.openai.cli_args import (  # noqa: F401  (the server's names, as vLLM's module has them)
    DEFAULT_MAX_BODY_BYTES, ServerSettings, add_server_args, engine_args_from, make_arg_parser, settings_from_args)
from plexus.entrypoints.openai.metrics import PrometheusStatLogger
from plexus.entrypoints.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LoadLoRAAdapterRequest, TokenizeRequest,
    UnloadLoRAAdapterRequest)
from plexus.entrypoints.openai.serving import LoRAModule, OpenAIError, OpenAIServing, error_body

logger = logging.getLogger("plexus")

_BODIES = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest, LoadLoRAAdapterRequest,
           UnloadLoRAAdapterRequest)


def plexus_version() -> str:
    try:
        return version("plexus-llm")
    except PackageNotFoundError:
        return "unknown"


def _error(message: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def build_app(serving: OpenAIServing, settings: ServerSettings, metrics: PrometheusStatLogger | None = None
              ) -> FastAPI:
    app = FastAPI(title="plexus OpenAI-compatible server", version=plexus_version())
    engine = serving.engine

    app.add_middleware(_Guard, api_key=settings.api_key, max_body=settings.max_request_body_bytes)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(f"the request body is not valid JSON: {first.get('msg')}", 400)
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more errors)"
        return _error(message, 400, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _error(str(e.detail), e.status_code)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError):
        return _error(str(e), 503)

    async def body_of(request: Request, model: type) -> Any:
        """Parse by hand, so a body that is not a JSON object is a 400 naming the problem, not a 422."""
        raw = await request.body()
        if len(raw) > settings.max_request_body_bytes:       # chunked bodies carry no Content-Length
            raise OpenAIError(f"the request body is over {settings.max_request_body_bytes} bytes", 413)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise OpenAIError(f"the request body is not valid JSON: {e}", 400) from None
        if not isinstance(data, dict):
            raise OpenAIError("the request body must be a JSON object", 400)
        try:
            return model.model_validate(data)
        except Exception as e:  # noqa: BLE001  (pydantic.ValidationError; anything else is the body's fault too)
            errors = getattr(e, "errors", lambda: [])()
            first = errors[0] if errors else {}
            where = ".".join(str(p) for p in first.get("loc", ()))
            message = f"{where}: {first.get('msg')}" if first else str(e)
            raise OpenAIError(message, 400, where or None) from None

    async def respond(request: Request, result) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        if isinstance(result, Response):      # the client went away first
            return result
        return StreamingResponse(_guard_stream(result), media_type="text/event-stream")

    # The handlers parse bodies by hand (body_of); the OpenAPI schema still documents each one, with the
    # models' nested definitions under components/schemas.
    refs, definitions = models_json_schema(
        [(m, "validation") for m in _BODIES], ref_template="#/components/schemas/{model}")

    def documented(model: type) -> dict:
        return {"requestBody": {"required": True,
                                "content": {"application/json": {"schema": refs[(model, "validation")]}}}}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.post("/v1/completions", openapi_extra=documented(CompletionRequest))
    async def completions(request: Request):
        body = await body_of(request, CompletionRequest)
        return await respond(request, await _cancel_on_disconnect(request, serving.completion(body)))

    @app.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await body_of(request, ChatCompletionRequest)
        return await respond(request, await _cancel_on_disconnect(request, serving.chat(body)))

    @app.get("/v1/models")
    async def models():
        return JSONResponse(serving.models())

    if settings.allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter", openapi_extra=documented(LoadLoRAAdapterRequest))
        async def load_lora_adapter(request: Request):
            body = await body_of(request, LoadLoRAAdapterRequest)
            return PlainTextResponse(await serving.load_lora_adapter(body))

        @app.post("/v1/unload_lora_adapter", openapi_extra=documented(UnloadLoRAAdapterRequest))
        async def unload_lora_adapter(request: Request):
            body = await body_of(request, UnloadLoRAAdapterRequest)
            return PlainTextResponse(await serving.unload_lora_adapter(body))

    @app.post("/tokenize", openapi_extra=documented(TokenizeRequest))
    async def tokenize(request: Request):
        return JSONResponse(serving.tokenize(await body_of(request, TokenizeRequest)))

    @app.post("/detokenize", openapi_extra=documented(DetokenizeRequest))
    async def detokenize(request: Request):
        return JSONResponse(serving.detokenize(await body_of(request, DetokenizeRequest)))

    @app.get("/health")
    async def health():
        await engine.check_health()
        return Response(status_code=200)

    @app.get("/ping")
    async def ping():
        await engine.check_health()
        return Response(status_code=200)

    @app.post("/ping")
    async def ping_post():
        return await ping()

    @app.get("/version")
    async def server_version():
        return JSONResponse({"version": plexus_version()})

    if metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        @app.get("/metrics")
        async def prometheus_metrics():
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Guard:
    """Pure ASGI middleware (it leaves streaming and disconnects alone): the API key on /v1/* (vLLM's --api-key /
    VLLM_API_KEY), and a 413 for a body declared larger than the limit, before it is read."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else b""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.api_key and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _error("Unauthorized: send the API key as 'Authorization: Bearer <key>'", 401)(
                    scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _error("invalid Content-Length header", 400)(scope, receive, send)
            if int(length) > self.max_body:
                return await _error(f"the request body is {int(length)} bytes; the limit is {self.max_body} "
                                    "(--max-request-body-bytes)", 413)(scope, receive, send)
        return await self.app(scope, receive, send)


async def _guard_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error in the middle of a stream (the engine died, a request failed) is sent as an error event, then
    [DONE]: the status line went out with the first event."""
    try:
        async for event in events:
            yield event
    except OpenAIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        yield f"data: {json.dumps(error_body(str(e), 503))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


async def _cancel_on_disconnect(request: Request, work) -> Any:
    """Run a handler's work, cancelling it (which aborts its requests) if the client goes away first, as
    vLLM's with_cancellation does. A stream's disconnects are caught by the response itself."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        return Response(status_code=499)     # nobody is listening; the status is for the access log
    return task.result()


@dataclasses.dataclass
class Server:
    """Everything one `plexus serve` runs: the engine loop, the endpoints and the app."""
    engine: AsyncLLM
    serving: OpenAIServing
    app: FastAPI
    settings: ServerSettings
    metrics: PrometheusStatLogger


def build_server(engine_args: EngineArgs, settings: ServerSettings) -> Server:
    """Load the model (on the engine loop's thread), read the LoRA modules, and build the app (not yet
    listening)."""
    lora_modules = [LoRAModule.parse(m) for m in settings.lora_modules]
    engine = AsyncLLM.from_engine_args(engine_args, max_num_queued_requests=settings.max_num_queued_requests)
    config = engine.engine.config
    names = engine_args.served_model_name
    names = list(names) if isinstance(names, (list, tuple)) else [config.model.served_model_name]
    metrics = PrometheusStatLogger(names[0], config.model.max_model_len,
                                   max_loras=config.lora.max_loras if config.lora is not None else 0)
    engine.engine.stat_loggers.append(metrics)      # before the first request: the loop is idle
    serving = OpenAIServing(engine, names, lora_modules, chat_template=settings.chat_template,
                            response_role=settings.response_role,
                            return_tokens_as_token_ids=settings.return_tokens_as_token_ids,
                            log_requests=settings.enable_log_requests)
    try:
        asyncio.run(serving.start())
    except Exception:
        engine.shutdown()
        raise
    return Server(engine, serving, build_app(serving, settings, metrics), settings, metrics)


def uvicorn_config(server: Server, **overrides: Any):
    import uvicorn

    s = server.settings
    kwargs = dict(host=s.host or "0.0.0.0", port=s.port, log_level=s.uvicorn_log_level,
                  access_log=not s.disable_uvicorn_access_log, timeout_keep_alive=5)
    kwargs.update(overrides)
    return uvicorn.Config(server.app, **kwargs)


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from_args(args)
    engine_args = engine_args_from(args)
    server = build_server(engine_args, settings)
    logger.info("serving %s on http://%s:%d (OpenAI API under /v1)", ", ".join(server.serving.served_model_names),
                settings.host or "0.0.0.0", settings.port)
    try:
        uvicorn.Server(uvicorn_config(server)).run()
    finally:
        server.engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = make_arg_parser()
    args = parser.parse_args(argv)
    try:
        return run_server(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"plexus serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
