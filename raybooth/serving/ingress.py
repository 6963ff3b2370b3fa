"""`Ingress`: the FastAPI router in front of the two model deployments (a thin layer, as in vLLM).

    GET  /healthz                    no auth, for load balancers: 200 when ready, 503 while models start
    GET  /v1/models                  the chat model and every servable image model
    GET  /v1/models/{id}
    POST /v1/chat/completions        -> ChatService  -> ChatDeployment (streaming, batched; with
                                        chat.placement ingress, this replica's own engine: local_handle.py)
    POST /v1/images/generations      -> ImageService -> ImageDeployment (batched, multiplexed)
    GET  /v1/internal/stats          what the batchers did (batch sizes, loaded model versions)
    GET  /openapi.json, /docs, /redoc   the API's schema (request bodies included) and its docs pages

Each route is admitted (`authorize`: Host and Content-Type rules of the keyless server, then the API key,
which the docs need too when keys are set), reads the body with the size limit, parses it into the
protocol model and hands it to the service. Every error leaves as the OpenAI error body with its status; client mistakes
are logged at INFO at most, never ERROR.
"""

import logging
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from raybooth.cluster import tracking
from raybooth.cluster.config import ServeConfig
from raybooth.models.safety import SafetyPolicy
from raybooth.openai.errors import APIError, validation_error
from raybooth.openai.protocol import ChatCompletionRequest, ImageGenerationRequest, ModelCard, ModelList
from raybooth.serving.auth import KeyChecker, check_bind_allowed, edge_refusal
from raybooth.serving.local_handle import LocalHandle
from raybooth.serving.readiness import Readiness
from raybooth.serving.serving_chat import ChatService
from raybooth.serving.serving_images import ImageService
from raybooth.serving.upstream import OverloadGuard, call_deployment, error_headers

logger = logging.getLogger("ray.serve")
T = TypeVar("T", bound=BaseModel)

# FastAPI's own docs routes would skip `admit`; the Ingress serves them itself, behind the same checks.
api = FastAPI(
    title="raybooth",
    description="OpenAI-compatible chat and personalised image generation.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
# The POST routes read their bodies themselves (size-limited), so FastAPI cannot see their schemas:
# they are published from the protocol models here.
_REQUEST_BODIES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/images/generations": ImageGenerationRequest,
}
api.add_middleware(OverloadGuard)  # JSON 503s before Serve's proxy would send its plain-text ones


# --------------------------------------------------------------------------------------------------
# Errors: one shape for everything
# --------------------------------------------------------------------------------------------------


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=error_headers(err))


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    if err.status >= 500:
        logger.warning("request failed: %s", err.message)  # overload/timeouts: the operator's concern
    return error_response(err)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return error_response(APIError(err.status_code, str(err.detail)))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(err.errors()))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it passes `max_bytes` (before it is all in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body of {declared} bytes exceeds limits.max_body_bytes={max_bytes}")
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds limits.max_body_bytes={max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


class EventStreamResponse(StreamingResponse):
    """An SSE response whose client may leave mid-stream without an ERROR in the log.

    While streaming, Starlette listens for the client's disconnect through ASGI `receive`. When the client
    leaves, Ray Serve's proxy cancels the replica's pending message fetch, and its `receive` can then raise
    `TaskCancelledError` instead of returning `http.disconnect` (it maps only a KeyError to a disconnect),
    which Serve logs as a failed request. It is a disconnect: treated as one, the stream just ends."""

    def __init__(self, lines: Any):
        super().__init__(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_or_disconnect() -> Message:
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await super().__call__(scope, receive_or_disconnect, send)


def parse_body(raw: bytes, model: type[T]) -> T:
    if not raw.strip():
        raise APIError(400, "request body is empty; send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e.errors()) from e


def openapi_schema() -> dict[str, Any]:
    """The app's OpenAPI document with the real request bodies of the POST routes."""
    if api.openapi_schema is None:
        doc = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in _REQUEST_BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas[model.__name__] = schema
            operation = doc.get("paths", {}).get(path, {}).get("post")
            if operation is not None:
                ref = {"$ref": f"#/components/schemas/{model.__name__}"}
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": ref}},
                }
        api.openapi_schema = doc
    return api.openapi_schema


def _bound_host(configured: str) -> str | None:
    """The address Serve's proxy listens on (its HTTP options win over our config's `host`)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # not inside a running Serve instance (unit tests): trust the config
        return configured


# --------------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------------


# Resources, replicas and queue limits come from the serve config, set once in serving/app.py's
# deployment_options (and a Serve config file may override them); nothing here repeats them.
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        chat: DeploymentHandle | None,
        images: DeploymentHandle,
        config: dict[str, Any],
        key_digests: list[str],
    ):
        self.cfg = ServeConfig.model_validate(config)
        OverloadGuard.configure(self.cfg.ingress.max_ongoing_requests, self.cfg.limits.retry_after_s)
        self.keys = KeyChecker(key_digests)
        check_bind_allowed(_bound_host(self.cfg.host), key_digests)
        tracking.configure(self.cfg.tracking)
        remote = [images.deployment_name]  # the deployments /healthz waits for
        if chat is None:  # chat.placement: ingress: this replica's own engine, called in-process
            from raybooth.serving.chat_deployment import ChatDeployment

            engine = ChatDeployment.func_or_class(
                self.cfg.chat.model_dump(), self.cfg.safety.model_dump(), self.cfg.chat_model
            )
            chat = LocalHandle(engine, "ChatDeployment")  # type: ignore[assignment]
        else:
            remote.insert(0, chat.deployment_name)
        policy = SafetyPolicy.from_settings(self.cfg.safety.model_dump())
        self.chat_model = self.cfg.chat_model_name or Path(self.cfg.chat_model).name
        self.chat = ChatService(chat, self.cfg, policy, self.chat_model)
        self.images = ImageService(images, self.cfg, policy)
        self.chat_handle, self.images_handle = chat, images
        self.readiness = Readiness(remote)
        self.bound_host = _bound_host(self.cfg.host)

    def authorize(self, request: Request) -> None:
        refusal = edge_refusal(
            request.method,
            request.headers.get("host"),
            request.headers.get("content-type"),
            keys_enabled=self.keys.enabled,
            bound_host=self.bound_host,
        )
        if refusal is not None:
            raise refusal
        if not self.keys.allows(request.headers.get("authorization")):
            raise APIError(
                401,
                "missing or incorrect API key; send Authorization: Bearer <key>",
                code="invalid_api_key",
            )

    @property
    def timeout_s(self) -> float:
        return self.cfg.ingress.request_timeout_s

    @api.get("/healthz")
    async def healthz(self) -> Any:
        """200 once every model deployment has a running replica; until then 503 with the OpenAI error body
        (returned, not raised: a load balancer's polls during start-up are no warnings for the log)."""
        try:
            missing = await self.readiness.missing()
        except TimeoutError:
            return error_response(
                APIError(503, "not ready: the Serve controller did not answer", code="not_ready")
            )
        if missing:
            message = f"not ready: no running replica of {', '.join(missing)} yet"
            return error_response(APIError(503, message, code="not_ready"))
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> ModelList:
        self.authorize(request)
        names = [self.chat_model, *await self.images.catalog.list()]
        return ModelList(data=[ModelCard(id=n) for n in dict.fromkeys(names)])

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> ModelCard:
        self.authorize(request)
        if model_id != self.chat_model:
            await self.images.catalog.check(model_id)
        return ModelCard(id=model_id)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self.authorize(request)
        req = parse_body(await read_body(request, self.cfg.limits.max_body_bytes), ChatCompletionRequest)
        if req.stream:
            lines = await self.chat.stream(req, self.timeout_s)
            return EventStreamResponse(lines)
        return await self.chat.complete(req, self.timeout_s)

    @api.post("/v1/images/generations")
    async def image_generations(self, request: Request):
        self.authorize(request)
        req = parse_body(await read_body(request, self.cfg.limits.max_body_bytes), ImageGenerationRequest)
        return await self.images.generate(req, self.timeout_s)

    @api.get("/v1/internal/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """One replica's view of each deployment (enough on one node; Prometheus has the fleet's)."""
        self.authorize(request)
        return {
            "images": await call_deployment(self.images_handle.stats.remote(), 30, "stats"),
            "chat": await call_deployment(self.chat_handle.stats.remote(), 30, "stats"),
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse(openapi_schema())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        self.authorize(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} - docs")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request):
        self.authorize(request)
        return get_redoc_html(openapi_url="/openapi.json", title=f"{api.title} - ReDoc")
