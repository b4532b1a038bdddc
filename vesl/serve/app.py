"""The Ray Serve application: the registered stages as deployments, behind one HTTP ingress.

- **Ingress** (FastAPI): `POST /v1/annotate`, `GET /healthz`, `GET /v1/config`. It parses and bounds the
  request, runs decode itself (a CPU task stage in the batch job: fetch through the guarded client, the
  same `read_image` and `decode_image`), then hands each row down the model stages in registry order.
- **A deployment per model stage** (caption, fuse, phrases, detect, as the config switches them on): the
  stage's own class and config, its rows from concurrent requests batched by `@serve.batch` up to the
  stage's `batch_size`, waiting at most `serve.batch_wait_ms`. Replicas, CPUs, GPUs and custom resources
  come from `serve.replicas` / `serve.autoscaling` and `ray.pools.<stage>` (sized as the batch job sizes
  its pools).

Backpressure: the ingress takes `serve.max_ongoing_requests` at once per replica and queues at most
`serve.max_queued_requests`, then answers 503 with Retry-After; each stage queues at most
`serve.stage_max_queued_requests` rows, then the request gets the same 503.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' annotations through Ray Serve's
# class-based view, which cannot resolve string annotations

import asyncio
from typing import Any

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from operators.registry import drops_after, stages
from schemas.columns import INPUT_SCHEMA, REJECT_REASON
from vesl.annotate.config import AnnotateConfigBase
from vesl.serve.requests import (
    BODY_TOO_LARGE,
    OVERLOADED,
    Limits,
    RequestError,
    answer_row,
    parse_body,
    reject_body,
)


def stage_class(name: str):
    return {s.name: s for s in stages()}[name]


class StageServer:
    """One model stage in a Serve replica: rows of concurrent requests run as one batch."""

    def __init__(self, name: str, config: Any, drop: tuple[str, ...], batch_size: int, wait_s: float,
                 storage_options: dict[str, Any]) -> None:
        self.stage = stage_class(name)(config, storage_options=storage_options, drop=drop)
        self.run.set_max_batch_size(batch_size)
        self.run.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run(self, rows: list[pa.Table]) -> list[pa.Table]:
        table = pa.concat_tables(rows, promote_options="permissive")
        out = await asyncio.to_thread(self.stage, table)
        return [out.slice(i, 1) for i in range(out.num_rows)]

    async def __call__(self, row: pa.Table) -> pa.Table:
        return await self.run(row)


def limits_of(config: AnnotateConfigBase) -> Limits:
    serve = config.serve
    return Limits(max_body_bytes=serve.max_body_bytes, max_images=serve.max_images,
                  max_image_bytes=config.decode.max_bytes, max_alt_text_chars=serve.max_alt_text_chars,
                  url_schemes=tuple(serve.url_schemes), allow_internal=serve.allow_internal_addresses)


def describe(config: AnnotateConfigBase) -> dict[str, Any]:
    """GET /v1/config: what labels this service gives (the label hash the batch job writes in its footer)."""
    from schemas.region_text import SCHEMA_VERSION

    models, thresholds = {}, {}
    for stage in config.active_stages():
        models.update(stage.describe_models(config.stage_config(stage)))
        thresholds.update(stage.thresholds(config.stage_config(stage)))
    limits = limits_of(config)
    return {"label_hash": config.label_hash(), "schema_version": SCHEMA_VERSION, "models": models,
            "thresholds": thresholds, "stages": [s.name for s in config.active_stages()],
            "limits": {"max_body_bytes": limits.max_body_bytes, "max_images": limits.max_images,
                       "max_image_bytes": limits.max_image_bytes, "max_pixels": config.decode.max_pixels,
                       "max_alt_text_chars": limits.max_alt_text_chars, "url_schemes": list(limits.url_schemes),
                       "request_timeout_s": config.serve.request_timeout_s}}


class Pipeline:
    """What the ingress runs for each image: decode here, then each model stage's deployment."""

    def __init__(self, config: AnnotateConfigBase, handles: dict[str, Any]) -> None:
        from vesl.serve.guard import http_options

        chain = config.active_stages()
        drops = drops_after(chain)
        decode = chain[0]
        options = {**config.storage.options(), **http_options(config.serve.allow_internal_addresses)}
        self.decode = decode(config.stage_config(decode), storage_options=options, drop=drops[decode.name])
        self.handles = [handles[s.name] for s in chain[1:]]
        self.limits = limits_of(config)

    async def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """ROW (a reader row) through every stage: the finished row, its reject columns set if one rejected it."""
        from ray.serve.exceptions import BackPressureError

        table = await asyncio.to_thread(self.decode, pa.Table.from_pylist([row], schema=INPUT_SCHEMA))
        for handle in self.handles:
            if table.column(REJECT_REASON)[0].is_valid:
                break
            try:
                table = await handle.remote(table)
            except BackPressureError as e:
                raise RequestError(503, OVERLOADED, f"the service is busy ({e}); retry later") from None
        return table.to_pylist()[0]

    async def annotate(self, raw: bytes) -> tuple[int, Any]:
        """(status, JSON body) for a POST /v1/annotate body."""
        try:
            rows, many = parse_body(raw, self.limits)
            done = await asyncio.gather(*(self.row(r) for r in rows))
        except RequestError as e:
            return e.status, e.body()
        answers = [reject_body(r) if r.get(REJECT_REASON) else answer_row(r) for r in done]
        if many:
            return 200, {"results": answers}
        return (422, answers[0]) if done[0].get(REJECT_REASON) else (200, answers[0])


async def read_body(request, limit: int) -> bytes | None:
    """The request body, or None when it has more than LIMIT bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, total = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return None
    return b"".join(chunks)


# Ray Serve copies the ingress class when it is decorated: everything it uses is defined above it.
web = FastAPI(title="vesl", description="region-text labels for one image at a time")


@serve.ingress(web)
class Ingress:
    """The HTTP front: the routes, each request bounded, parsed and run through `Pipeline`."""

    def __init__(self, config: AnnotateConfigBase, handles: dict[str, Any]) -> None:
        self.config, self.pipeline = config, Pipeline(config, handles)
        self.described = describe(config)

    @web.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @web.get("/v1/config")
    def settings(self) -> dict[str, Any]:
        return self.described

    @web.post("/v1/annotate")
    async def annotate(self, request: Request) -> JSONResponse:
        limit = self.config.serve.max_body_bytes
        raw = await read_body(request, limit)
        status, body = (await self.pipeline.annotate(raw)) if raw is not None else (
            413, RequestError(413, BODY_TOO_LARGE, f"the body has more than {limit} bytes").body())
        headers = {"Retry-After": str(max(1, round(self.config.serve.retry_after_s)))} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)


def build_app(config: AnnotateConfigBase, cluster: dict[str, float] | None = None):
    """The Serve application of CONFIG: a deployment per active model stage and the ingress."""
    from ray.serve.config import BackpressureConfig

    from vesl.annotate.pools import plan_pools

    cluster = cluster or {"CPU": 1.0}
    pools = plan_pools(cluster.get("CPU", 1.0), cluster.get("GPU", 0.0), config)
    drops = drops_after(config.active_stages())
    serve_config = config.serve
    backpressure = BackpressureConfig(status_code=503, retry_after_s=serve_config.retry_after_s)
    handles = {}
    for stage in config.active_stages()[1:]:
        cfg, pool = config.stage_config(stage), pools[stage.name]
        scaling = serve_config.autoscaling.get(stage.name)
        options = dict(name=f"vesl-{stage.name}", ray_actor_options={
            "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "resources": dict(pool.resources)},
            max_ongoing_requests=max(2 * cfg.batch_size, 4), backpressure_config=backpressure,
            max_queued_requests=serve_config.stage_max_queued_requests)
        options.update({"autoscaling_config": scaling} if scaling else {
            "num_replicas": serve_config.replicas.get(stage.name, pool.size or 1)})
        handles[stage.name] = serve.deployment(StageServer, **options).bind(
            stage.name, cfg, drops[stage.name], cfg.batch_size, serve_config.batch_wait_ms / 1000.0,
            config.storage.options())
    scaling = serve_config.autoscaling.get("ingress")
    ingress = serve.deployment(Ingress, name="vesl-ingress", max_ongoing_requests=serve_config.max_ongoing_requests,
                               max_queued_requests=serve_config.max_queued_requests,
                               backpressure_config=backpressure, ray_actor_options={"num_cpus": 0.1},
                               **({"autoscaling_config": scaling} if scaling else
                                  {"num_replicas": serve_config.ingress_replicas}))
    return ingress.bind(config, handles)


def app_builder(args: dict[str, Any]):
    """The application for a Serve config file or a KubeRay RayService (`import_path:
    vesl.serve.app:app_builder`, `args: {preset, config, set: [...]}`), sized on the cluster it runs on."""
    import ray

    from vesl.annotate.config import load_config

    unknown = sorted(set(args) - {"preset", "config", "set"})
    if unknown:
        raise ValueError(f"vesl.serve.app:app_builder takes args preset, config and set; not {unknown}")
    config = load_config(args.get("config"), args.get("preset"), list(args.get("set") or []))
    return build_app(config, ray.cluster_resources() if ray.is_initialized() else None)
