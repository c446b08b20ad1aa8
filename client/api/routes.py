"""HTTP routes on aiohttp: the OpenAI-compatible endpoints and the chat page.

Handlers only translate: a body -> ``CompletionRequest`` (``protocol``), the engine's events -> JSON or
server-sent events (``responses``). Every error becomes OpenAI's error body in one middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from client.api.engine import Engine, Generation
from client.api.errors import APIError, from_exception
from client.api.protocol import Limits, parse_body, parse_chat, parse_completion
from client.api.responses import DONE, Completion, model_card, models, sse

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Errors of the API's paths as OpenAI's error body; the page's paths keep aiohttp's answers."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/v1/"):
            raise
        code = "request_too_large" if exc.status == 413 else None
        error = APIError(
            exc.status, f"{exc.reason}: {request.method} {request.path}", "invalid_request_error", None, code
        )
    except Exception as exc:
        error = from_exception(exc)
    return web.json_response(error.body(), status=error.status, headers=error.headers)


class Routes:
    def __init__(self, engine: Engine, tokenizer, limits: Limits, created: int):
        self.engine, self.tokenizer, self.limits, self.created = engine, tokenizer, limits, created

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(middlewares=[openai_errors], client_max_size=max_body_bytes)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/api/v1/usage", self.usage)
        return app

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(models(self.limits.model_ids[0], self.created))

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.limits.model_ids:
            raise APIError(
                404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found"
            )
        return web.json_response(model_card(self.limits.model_ids[0], self.created))

    async def usage(self, request: web.Request) -> web.Response:
        """Per-key usage (names, never secrets): every key's for an admin key or without keys, else the caller's."""
        limiter = self.engine.limiter
        caller = limiter.authenticate(request.headers.get("Authorization"))
        report = limiter.report()
        if limiter.keys is not None and not caller.admin:
            report = [row for row in report if row["name"] == caller.name]
        return web.json_response({"fair_share": self.engine.config.fair_share, "keys": report})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_completion)

    async def _serve(self, request: web.Request, parse: Callable) -> web.StreamResponse:
        api_key = self.engine.limiter.authenticate(request.headers.get("Authorization"))
        completion_request = parse(parse_body(await request.read()), self.tokenizer, self.limits)
        generation = await self.engine.submit(completion_request, api_key)
        try:
            await generation.opened  # errors before any output (e.g. 503: missing blocks) get their status
            completion = Completion(completion_request.chat, self.limits.model_ids[0])
            if completion_request.stream:
                return await self._stream(request, generation, completion)
            return web.json_response(await self._whole(generation, completion))
        finally:
            self.engine.cancel(generation)  # no-op once finished; frees the sessions if the client went away

    async def _whole(self, generation: Generation, completion: Completion) -> dict:
        while True:
            event = await generation.events.get()
            if event.error is not None:
                raise event.error
            if event.finish_reason is not None:
                text, usage = generation.tracker.text, generation.usage
                return completion.response(text, event.finish_reason, usage, generation.route)

    async def _stream(self, request: web.Request, generation: Generation, completion: Completion):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        usage = generation.request.include_usage
        try:
            if completion.chat:
                await response.write(sse(completion.chunk(first=True, with_usage=usage)))
            while True:
                event = await generation.events.get()
                if event.error is not None:  # after the headers: an error event, as OpenAI sends one
                    await response.write(sse(from_exception(event.error).body()))
                    break
                if event.finish_reason is None:
                    await response.write(sse(completion.chunk(event.text, with_usage=usage)))
                    continue
                last = completion.chunk(finish_reason=event.finish_reason, route=generation.route, with_usage=usage)
                await response.write(sse(last))
                if usage:
                    await response.write(sse(completion.usage_chunk(generation.usage)))
                await response.write(DONE)
                break
        except ConnectionResetError:
            logger.debug("Client went away during a stream")
        return response
