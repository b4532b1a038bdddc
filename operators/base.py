"""The stage contract, and the batch plumbing every stage shares.

A stage is a subclass of `Stage` in one file of `operators/`, listed once in `operators.registry`. It
declares its name, its config class, the columns it reads and writes, the reject reasons it may
record and the resources it runs on, and implements `process`: given a chunk of rows holding only the
columns it `reads` (it cannot see any other), each row's new column values or a `Reject`, in order.
`Stage.__call__` does the rest once for all stages: columnar batch in (a `pyarrow.Table`, or a dict
of columns), rows an earlier stage rejected skipped, the rows cut into chunks of `config.batch_size`,
per-row fault isolation (a chunk that raises is retried row by row, so one bad row costs one reject),
typed columns out, reject marking, dropping the columns no later stage reads, and timing: each handled
row carries the stage's seconds per row in a `SECONDS_PREFIX<name>` column, which the writer sums per
work unit (rows in, seconds) into the completion records and the run manifest, and so are the counts
a stage declares in `metrics` (a model stage's prompt and generated tokens per row). A stage never
raises on a bad row.

pyarrow is imported where a batch is handled, not at import time, so the model methods of a stage
(`detect`, `caption_images`) can be driven on a machine with only torch and transformers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from schemas.columns import COLUMNS, REJECT_COLUMNS, REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.rejects import RejectReason
from vesl.core.models import describe_pretrained, load_pretrained, load_processor, resolve_device, resolve_dtype
from vesl.core.settings import Settings
from vesl.core.text import MAX_MESSAGE_CHARS, describe_error
from vesl.errors import NOT_A_ROWS_FAULT

if TYPE_CHECKING:  # pyarrow is imported where a batch is handled, not at import time
    import pyarrow as pa

log = logging.getLogger("vesl.stage")
SECONDS_PREFIX = "__vesl_seconds__"  # + stage name: that stage's seconds per row it handled (null: not handled)
METRIC_PREFIX = "__vesl_metric__"  # + "stage.metric": a stage's count for a row (tokens), summed like seconds
METRICS = "__metrics__"  # key of a row result holding its counts: {metric: number}, metric in `Stage.metrics`

class StageConfig(Settings):
    """Base of a stage's config section (`[stage name]` in the annotate config)."""


class ModelStageConfig(StageConfig):
    """The settings of a stage that holds a Hugging Face model, and the one way such a stage loads it:
    safetensors only, remote code off unless `trust_remote_code`, the same `from_pretrained` for a hub id
    and a local path. A stage redeclares `model` (its default) and any field whose default differs."""

    model: str = Field(description="Hub id or local path of the model.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin; the "
                                 "footer records the resolved commit.")
    trust_remote_code: bool = Field(default=False, description="Allow the model repo's own Python code.")
    batch_size: int = Field(default=16, ge=1, description="Rows per model call.")
    device: str = Field(default="auto", description="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="'auto': bfloat16 on CUDA, float32 on the CPU.")
    attn_implementation: str | None = Field(default="sdpa", description="'sdpa', 'eager', 'flash_attention_2', "
                                            "or None: transformers' choice.")

    def load_model(self, model_cls: Any) -> tuple[Any, str, Any]:
        """(MODEL_CLS.from_pretrained(self.model) in eval mode on its device, the device, the dtype)."""
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        model = load_pretrained(model_cls, self.model, revision=self.revision, trust_remote_code=self.trust_remote_code,
                                device=device, dtype=dtype, attn_implementation=self.attn_implementation)
        return model, device, dtype

    def load_processor(self, **kwargs: Any) -> Any:
        return load_processor(self.model, revision=self.revision, trust_remote_code=self.trust_remote_code, **kwargs)

    def describe(self) -> dict[str, str]:
        """What the footer's `vesl.models` records about the model (read from its config, no weights loaded)."""
        return describe_pretrained(self.model, self.revision, self.trust_remote_code)


# a generative stage's settings that change how fast it runs, not what it writes (left out of the label hash)
GENERATIVE_SPEED_SETTINGS = ("batch_size", "device", "max_concurrency", "timeout_s", "max_retries", "backoff_s",
                             "api_key_env")
# the settings only the openai backend reads
SERVED_ONLY = frozenset({"backend", "endpoint", "api_key_env", "max_concurrency", "timeout_s", "max_retries",
                         "backoff_s", "request_params", "image_max_side", "image_quality"})


class GenerativeStageConfig(ModelStageConfig):
    """A stage that generates text (caption, fuse): in process (`backend: local`, the model on the actor's
    device) or on an inference server through its OpenAI-compatible chat API (`backend: openai`: vLLM,
    SGLang, TGI, `transformers serve`, a hosted API; `model` is then the served model's name). The subclass
    declares max_new_tokens, min_new_tokens, num_beams and repetition_penalty."""

    backend: Literal["local", "openai"] = Field(
        default="local", description="'local': the model runs in the stage's actors. 'openai': requests go to "
        "`endpoint`'s /v1/chat/completions; the stage then needs no GPU.")
    endpoint: str | list[str] | None = Field(
        default=None, description="backend openai: the server's URL (http://host:8000 or .../v1), or a list of "
        "replicas the requests are spread over.")
    api_key_env: str | None = Field(
        default=None, description="backend openai: the environment variable holding the API key (sent as a bearer "
        "token). The key itself never goes in a config, the manifest, a footer or a log.")
    max_concurrency: int = Field(default=16, ge=1, description="backend openai: requests in flight per actor.")
    timeout_s: float = Field(default=120.0, gt=0, description="backend openai: one request's time limit.")
    max_retries: int = Field(
        default=8, ge=0, description="backend openai: retries of a request that failed transiently (no connection, "
        "timeout, 429, 5xx), with backoff (backoff_s, doubled at each retry up to 30 s, or the server's "
        "Retry-After). Past them the server is down: the job stops (exit 8) and a re-run finishes it.")
    backoff_s: float = Field(
        default=1.0, gt=0, le=30, description="backend openai: the wait before the first retry (1, 2, 4, ... 30 s "
        "by default); a server near the job that restarts in seconds is met sooner with less. A speed setting: "
        "it does not change the labels.")
    request_params: dict[str, Any] = Field(
        default_factory=dict, description="backend openai: extra fields of every request (a server's own sampling "
        "parameters), e.g. {top_k: 1}.")
    section: ClassVar[str] = "stage"  # the config section's name, in error messages

    @model_validator(mode="after")
    def _backend_settings(self):
        self.check_backend(self.section)
        return self

    def endpoints(self) -> list[str]:
        return [self.endpoint] if isinstance(self.endpoint, str) else list(self.endpoint or [])

    def check_backend(self, section: str) -> None:
        """Settings the openai backend cannot honour are refused when the config is read."""
        from vesl.core.serving import normalise_endpoint

        if self.backend != "openai":
            return
        if not self.endpoints():
            raise ValueError(f"{section}.backend openai needs {section}.endpoint (a URL or a list of URLs)")
        for url in self.endpoints():
            normalise_endpoint(url)
        if getattr(self, "num_beams", 1) != 1:
            raise ValueError(f"{section}.backend openai decodes greedily: {section}.num_beams must be 1")

    def sampling(self) -> dict[str, Any]:
        """The request fields of this stage's decoding: max_tokens, greedy (temperature 0), and the
        repetition penalty and minimum length where they differ from the API's defaults (vLLM and SGLang
        take them; a server that does not is found by the preflight)."""
        fields: dict[str, Any] = {"max_tokens": self.max_new_tokens, "temperature": 0.0}
        if self.repetition_penalty != 1.0:
            fields["repetition_penalty"] = self.repetition_penalty
        if self.min_new_tokens:
            fields["min_tokens"] = self.min_new_tokens
        return {**fields, **self.request_params}

    def client(self, label: str):
        from vesl.core.serving import ChatClient

        return ChatClient(self.endpoints(), self.model, api_key_env=self.api_key_env,
                          max_concurrency=self.max_concurrency, timeout_s=self.timeout_s,
                          max_retries=self.max_retries, backoff_s=self.backoff_s, label=label)

    def label_exclude(self) -> tuple[str, ...]:
        """Settings left out of the label hash: the openai backend's own while the backend is local (so a
        local run's hash is what it was before there was a backend setting)."""
        return () if self.backend == "openai" else tuple(k for k in type(self).model_fields if k in SERVED_ONLY)


@dataclass(frozen=True)
class Resources:
    """What a stage runs on. The pool sizes and per-actor CPUs/GPUs are derived from the cluster
    (`vesl.annotate.pools.plan_pools`) unless `ray.pools.<stage>` sets them."""

    actor: bool = True  # an actor pool whose actors hold a model; False: stateless Ray Data tasks
    gpu: bool = False  # takes a share of the cluster's GPUs when it has any (and the config's device allows)
    num_cpus: float | None = None  # CPUs per task of a task stage (None: sized like the actor pools)
    whole_blocks: bool = False  # one Ray Data block per call; config.batch_size is then the stage's own inner batch


@dataclass(frozen=True)
class Reject:
    """A row this stage refuses, with one of its declared reasons."""

    reason: RejectReason
    message: str



class Stage:
    """Base of every stage. Subclasses set the class attributes and implement `process`."""

    name: ClassVar[str]  # config section, pool, funnel and `reject_stage` name
    config_class: ClassVar[type[StageConfig]]
    reads: ClassVar[tuple[str, ...]] = ()  # columns it needs (written by the reader or an earlier stage)
    writes: ClassVar[tuple[str, ...]] = ()  # columns it sets (types from schemas.columns, else `column_types`)
    column_types: ClassVar[Mapping[str, Any]] = {}  # pyarrow types of columns it adds that schemas.columns lacks
    reasons: ClassVar[tuple[RejectReason, ...]] = ()  # every reason it may record
    error_reason: ClassVar[RejectReason] = RejectReason.MODEL_ERROR  # a row `process` raised on
    resources: ClassVar[Resources] = Resources()
    speed_settings: ClassVar[tuple[str, ...]] = ("batch_size", "device")  # config keys left out of the label hash
    # counts a row result may carry under METRICS (e.g. prompt_tokens); summed per unit and run like seconds
    metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StageConfig | None = None, *, storage_options: Mapping[str, Any] | None = None,
                 drop: Sequence[str] = ()) -> None:
        self.config = config or self.config_class()
        self.storage_options = dict(storage_options or {})
        self.drop = tuple(drop)  # columns no later stage reads (set by the wiring)

    # -- what a stage implements ------------------------------------------------------------------
    def process(self, batch: pa.Table) -> Sequence[dict[str, Any] | Reject]:
        """For each row of BATCH (rows no stage has rejected, only the columns of `reads`), in order: its
        values of `writes`, or a Reject."""
        raise NotImplementedError

    @classmethod
    def describe_models(cls, config: StageConfig) -> dict[str, Any]:
        """What the footer's `vesl.models` records about this stage's models (no weights loaded)."""
        return {}

    @classmethod
    def wants_gpu(cls, config: StageConfig) -> bool:
        """Whether this stage takes a GPU share when the cluster has GPUs (not when its device is 'cpu', nor when
        its model runs on an inference server: `backend: openai`)."""
        return (cls.resources.gpu and getattr(config, "device", "auto") != "cpu"
                and getattr(config, "backend", "local") == "local")

    @classmethod
    def active(cls, config: StageConfig) -> bool:
        """Whether the job runs this stage (a stage its config switches off is left out of the wiring)."""
        return getattr(config, "enabled", True)

    @classmethod
    def thresholds(cls, config: StageConfig) -> dict[str, Any]:
        """The settings of this stage the footer's `vesl.thresholds` records."""
        return {}

    # -- the plumbing, once for all stages --------------------------------------------------------
    @classmethod
    def type_of(cls, column: str):
        return cls.column_types[column] if column in cls.column_types else COLUMNS[column]

    def chunk_rows(self) -> int | None:
        # backend openai: a whole block per call, `max_concurrency` of its requests in flight
        whole = self.resources.whole_blocks or getattr(self.config, "backend", "local") == "openai"
        return None if whole else getattr(self.config, "batch_size", None)

    def view(self, table: pa.Table) -> pa.Table:
        """The columns of `reads`, and only those (a declared column the batch lacks is all nulls)."""
        import pyarrow as pa

        columns = {c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows, self.type_of(c))
                   for c in self.reads}
        return pa.table(columns)

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        import pyarrow as pa

        started = time.perf_counter()
        table = as_table(batch)
        view = self.view(table)
        values: dict[str, list[Any]] = {c: [None] * table.num_rows for c in self.writes}
        counts: dict[str, list[Any]] = {m: [None] * table.num_rows for m in self.metrics}
        rejects: dict[int, tuple[str, str]] = {}
        rows = pending_rows(table)
        size = self.chunk_rows() or max(1, len(rows))
        for start in range(0, len(rows), size):
            done, failed = run_isolating_rows(rows[start:start + size], lambda chunk: self._run(view, chunk),
                                              self.error_reason)
            rejects.update(failed)
            for r, result in done.items():
                if isinstance(result, Reject):
                    rejects[r] = (result.reason.value, result.message)
                else:
                    for column in self.writes:
                        values[column][r] = result[column]
                    for metric, n in (result.get(METRICS) or {}).items():
                        counts[metric][r] = n
        for column in self.writes:
            table = put_column(table, column, values[column], self.type_of(column))
        for metric in self.metrics:  # every batch carries them, so Ray Data's blocks share one schema
            table = put_column(table, f"{METRIC_PREFIX}{self.name}.{metric}", counts[metric], pa.float64())
        table = table.drop_columns([c for c in self.drop if c in table.column_names])
        table = mark_rejects(table, self.name, rejects)
        seconds = time.perf_counter() - started
        per_row = np.full(table.num_rows, np.nan)
        per_row[rows] = seconds / max(1, len(rows))
        table = put_column(table, SECONDS_PREFIX + self.name, per_row, pa.float64(), nan_is_null=True)
        log.debug("stage %s: %d rows (%d pending, %d rejected here) in %.3f s", self.name, table.num_rows,
                  len(rows), len(rejects), seconds)
        return table

    def _run(self, view: pa.Table, chunk: Sequence[int]) -> dict[int, Any]:
        import pyarrow as pa

        contiguous = chunk[-1] - chunk[0] + 1 == len(chunk)  # the usual case: a zero-copy slice, no take
        rows = view.slice(chunk[0], len(chunk)) if contiguous else view.take(pa.array(chunk, pa.int64()))
        results = list(self.process(rows))
        if len(results) != len(chunk):
            raise RuntimeError(f"stage {self.name} returned {len(results)} results for {len(chunk)} rows")
        for result in results:
            if not isinstance(result, Reject) and not set(result.get(METRICS) or {}) <= set(self.metrics):
                raise ValueError(f"stage {self.name} counted {sorted(result[METRICS])}; it declares {self.metrics}")
            if isinstance(result, Reject) and result.reason not in self.reasons:
                raise ValueError(f"stage {self.name} rejected a row as {result.reason!r}, which it does not "
                                 f"declare in `reasons` {[str(x) for x in self.reasons]}")
            if not isinstance(result, Reject) and set(result) - {METRICS} != set(self.writes):
                raise ValueError(f"stage {self.name} wrote {sorted(result)}; it declares {sorted(self.writes)}")
        return dict(zip(chunk, results))


def run_stage_task(batch: pa.Table | Mapping[str, Any], stage: type[Stage], config: StageConfig,
                   storage_options: Mapping[str, Any] | None = None, drop: Sequence[str] = ()) -> pa.Table:
    """A task stage (no model worth an actor) as the function Ray Data's map_batches calls."""
    return stage(config, storage_options=storage_options, drop=drop)(batch)


def as_table(batch: pa.Table | Mapping[str, Any]) -> pa.Table:
    """Accept a pyarrow Table or a dict of columns (numpy arrays or lists); the reject columns are added
    when missing."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        table = batch
    else:
        table = pa.table({k: (v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else v)
                          for k, v in batch.items()})
    for name in REJECT_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table


def put_column(table: pa.Table, name: str, values: Sequence[Any] | pa.Array, type: pa.DataType,
               nan_is_null: bool = False) -> pa.Table:
    """Set column NAME (replacing it if present) with an explicit Arrow type."""
    import pyarrow as pa

    array = (values if isinstance(values, (pa.Array, pa.ChunkedArray))
             else pa.array(values, type=type, from_pandas=nan_is_null))
    if array.type != type:
        array = array.cast(type)
    index = table.schema.get_field_index(name)
    if index >= 0:
        return table.set_column(index, name, array)
    return table.append_column(name, array)


def pending_rows(table: pa.Table) -> list[int]:
    """Indices of the rows no stage has rejected yet."""
    import pyarrow.compute as pc

    return np.flatnonzero(pc.is_null(table.column(REJECT_STAGE)).to_numpy(zero_copy_only=False)).tolist()


def mark_rejects(table: pa.Table, stage: str, rejects: Mapping[int, tuple[str, str]]) -> pa.Table:
    """Reject rows: {row index: (reason, message)}; rows already rejected keep their first reason."""
    import pyarrow as pa

    if not rejects:
        return table
    stages = table.column(REJECT_STAGE).to_pylist()
    reasons = table.column(REJECT_REASON).to_pylist()
    messages = table.column(REJECT_MESSAGE).to_pylist()
    for i, (reason, message) in rejects.items():
        if stages[i] is None:
            stages[i], reasons[i], messages[i] = stage, reason, (message or "")[:MAX_MESSAGE_CHARS]
    for name, values in ((REJECT_STAGE, stages), (REJECT_REASON, reasons), (REJECT_MESSAGE, messages)):
        table = put_column(table, name, values, pa.string())
    return table


def run_isolating_rows(
    rows: Sequence[int],
    fn: Callable[[Sequence[int]], dict[int, Any]],
    reason: str = RejectReason.MODEL_ERROR,
) -> tuple[dict[int, Any], dict[int, tuple[str, str]]]:
    """Run FN on all ROWS at once; if it raises, run it on each row alone.

    Returns (results by row, rejects by row as (REASON, message)): one bad row costs one reject, never
    the batch. An inference server that stays down, refuses the key or cannot be used (`NOT_A_ROWS_FAULT`)
    is no row's fault: it is raised, never recorded as rejects, and stops the job."""
    if not rows:
        return {}, {}
    try:
        return fn(rows), {}
    except NOT_A_ROWS_FAULT:
        raise
    except Exception as batch_error:  # noqa: BLE001 - any failure falls back to per-row
        if len(rows) == 1:
            return {}, {rows[0]: (str(reason), describe_error(batch_error))}
    results: dict[int, Any] = {}
    rejects: dict[int, tuple[str, str]] = {}
    for row in rows:
        try:
            results.update(fn([row]))
        except NOT_A_ROWS_FAULT:
            raise
        except Exception as row_error:  # noqa: BLE001
            rejects[row] = (str(reason), describe_error(row_error))
    return results, rejects


def served_results(answers: Sequence[Any], clean: Callable[[str], str], values: Callable[[str], dict[str, Any]],
                   refused: str, empty: Reject) -> list[dict[str, Any] | Reject]:
    """Each inference server's answer (`vesl.core.serving.Answer`, backend openai) as its row's result: the
    server's refusal (request_refused, REFUSED naming the row), EMPTY when CLEAN leaves no text (the answer's
    problem added to its message), else VALUES(text) with the answer's token counts."""
    out: list[dict[str, Any] | Reject] = []
    for answer in answers:
        text = clean(answer.text or "")
        if answer.error:
            out.append(Reject(RejectReason.REQUEST_REFUSED, f"the inference server refused {refused}: {answer.error}"))
        elif not text:
            out.append(Reject(empty.reason, f"{empty.message} ({answer.problem})"))
        else:
            counts = {"prompt_tokens": answer.usage.get("prompt_tokens"),
                      "generated_tokens": answer.usage.get("completion_tokens")}
            out.append({**values(text), METRICS: {k: v for k, v in counts.items() if v is not None}})
    return out


def token_counts(model: Any, inputs: Mapping[str, Any], generated: Any) -> list[dict[str, int]]:
    """Per row of a batched generate call: `prompt_tokens` (its attention mask: the visual tokens of a
    VLM included, the left padding not), `visual_tokens` (the prompt's image tokens, for a model with an
    image token id) and `generated_tokens` (the new tokens GENERATED holds up to and with the first
    end-of-sequence token; the rest is padding)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    image_token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
    out = []
    for r, row in enumerate(generated.tolist()):
        end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        counts = {"generated_tokens": end}
        if mask is not None:
            counts["prompt_tokens"] = int(mask[r].sum())
        if ids is not None and image_token is not None:
            counts["visual_tokens"] = int((ids[r] == image_token).sum())
        out.append(counts)
    return out


def image_from_row(table: pa.Table, row: int) -> np.ndarray:
    """The decoded RGB working copy of ROW as an (H, W, 3) uint8 array (zero-copy)."""
    data = table.column("pixels")[row].as_buffer()
    h = table.column("pixel_height")[row].as_py()
    w = table.column("pixel_width")[row].as_py()
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
