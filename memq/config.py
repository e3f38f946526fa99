"""memq settings: one frozen pydantic-settings model read from ``MEMQ_*`` environment variables.

Nested groups use ``__`` as the delimiter, e.g. ``MEMQ_REDIS__URL``, ``MEMQ_QDRANT__PATH``,
``MEMQ_LLM__MODEL``. Build it once per process with :func:`load_settings` and pass it down.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from memq.errors import InvalidSettings

OFFLINE_MODEL = "memq-offline/heuristic-v1"
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RedisSettings(_Group):
    """Broker and result backend (Redis); job records live here too."""

    url: str = "redis://127.0.0.1:6379/0"
    result_url: str | None = Field(default=None, description="Result backend URL; defaults to `url`.")
    socket_timeout_s: float = 5.0
    visibility_timeout_s: int = Field(
        default=900, gt=0,
        description="A message not acked by then is delivered again (a killed worker's tasks come back); "
                    "longer than the longest stage plus its countdowns (retry waits are at most jobs.retry_backoff_max_s).")

    @property
    def backend_url(self) -> str:
        """The Celery result backend URL (`result_url`, else `url`)."""
        return self.result_url or self.url


class QdrantSettings(_Group):
    """Vector store: a Qdrant server `url`, else the embedded Qdrant Edge store under `path` (one owner
    process per folder; other processes read through it)."""

    url: str | None = None
    api_key: SecretStr | None = None
    path: Path | None = Field(default=None, description="Embedded store's folder (the shard is PATH/COLLECTION); "
                                                         "defaults to DATA_DIR/qdrant.")
    collection: str = "memq"
    timeout_s: float = Field(default=10.0, gt=0, description="A server request's timeout, and how long a reader "
                                                            "waits for the embedded store's owner to answer (s).")
    hybrid: bool = Field(default=True, description="Searches fuse the dense ranking with BM25 keyword matches "
                                                   "(reciprocal rank fusion; `stores.sparse`); false: dense only.")


class Neo4jSettings(_Group):
    """Graph store; graph memory is on only when `uri` is set (issue: graph memory)."""

    uri: str | None = None
    user: str = "neo4j"
    password: SecretStr | None = None
    database: str | None = Field(default=None, description="None: the server's default database.")


class HistorySettings(_Group):
    """SQL audit trail of memory events; any SQLAlchemy URL, SQLite file by default."""

    url: str | None = Field(default=None, description="Defaults to sqlite:///DATA_DIR/history.db.")


class LLMSettings(_Group):
    """The model behind extraction and decisions, called through litellm.

    `model` is any litellm model string (``openai/gpt-4o-mini``, ``anthropic/...``); the default is the
    built-in offline heuristic baseline, which is not an LLM.
    """

    model: str = OFFLINE_MODEL
    api_base: str | None = None
    api_key: SecretStr | None = None
    temperature: float = 0.0
    timeout_s: float = 60.0
    max_tokens: int = 2000
    rpm: int | None = Field(default=None, gt=0, description="Requests per minute for `model`, shared by all "
                            "workers through Redis: a ceiling (a provider's 429s may lower the rate below it, "
                            "`broker.adaptive`); None: no ceiling, memq starts unlimited and learns the "
                            "provider's limit from its 429s.")
    tpm: int | None = Field(default=None, gt=0, description="Tokens per minute (prompt plus completion) for "
                            "`model`, shared by all workers through Redis; None: unlimited.")
    burst_s: float = Field(default=60.0, gt=0, le=60, description="Seconds of budget that may be spent at once "
                           "(60: a whole minute, as most providers allow; a few seconds for sliding windows).")


class VisionSettings(_Group):
    """The vision model of the caption stage (images in messages become text), through litellm.

    With no `model`, an image is described only by a caption its message supplies (``caption``/``alt``
    on the image part); an image with neither is dropped and the job's result says so. With `fetch`,
    memq downloads http(s) images itself and sends their bytes (for providers that cannot fetch URLs).
    """

    model: str | None = Field(default=None, description="Any litellm vision model (``openai/gpt-4o-mini``); "
                              "None: supplied captions only.")
    api_base: str | None = None
    api_key: SecretStr | None = None
    timeout_s: float = 60.0
    max_tokens: int = Field(default=1000, gt=0, description="Reply tokens of one captioning call.")
    rpm: int | None = Field(default=None, gt=0, description="Requests per minute for the vision model, its own "
                            "budget in the shared limiter (apart from `llm`'s even for the same model name).")
    tpm: int | None = Field(default=None, gt=0, description="Tokens per minute for the vision model (shared limiter).")
    burst_s: float = Field(default=60.0, gt=0, le=60)
    max_images_per_call: int = Field(default=8, gt=0, le=50, description="Images described in one request "
                                     "(1 for providers that take one image per request).")
    max_caption_chars: int = Field(default=600, gt=0, description="A model caption longer than this is cut.")
    cache_ttl_s: int = Field(default=30 * 24 * 3600, gt=0, description="How long a model caption stays in the "
                             "shared cache (Redis), keyed by the image's bytes or URL and the model.")
    fetch: bool = Field(default=False, description="Download http(s) images and send their bytes (never for "
                        "loopback, private, link-local or metadata addresses).")
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="Whole download of one image (seconds).")
    fetch_max_bytes: int = Field(default=5_000_000, gt=0, description="Largest image downloaded (bytes).")
    fetch_max_redirects: int = Field(default=3, ge=0, description="Redirects followed, each target checked again.")
    allow_networks: tuple[str, ...] = Field(default=(), description="CIDR networks (``10.8.0.0/16``) of the "
                                      "operator's own image hosts: allowed despite being private (metadata "
                                      "addresses never are).")

    @model_validator(mode="after")
    def _networks(self) -> VisionSettings:
        import ipaddress

        for net in self.allow_networks:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad value
        return self

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """`allow_networks` parsed."""
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.allow_networks)

    def llm_settings(self) -> LLMSettings | None:
        """The model's call settings in the shape `pipeline.llm.LLM` takes; None without a `model`."""
        if self.model is None:
            return None
        return LLMSettings(model=self.model, api_base=self.api_base, api_key=self.api_key, timeout_s=self.timeout_s,
                           max_tokens=self.max_tokens, rpm=self.rpm, tpm=self.tpm, burst_s=self.burst_s)


class PromptSettings(_Group):
    """Instructions that replace memq's built-in ones for every job (Mem0's ``custom_fact_extraction_prompt``
    and ``custom_update_memory_prompt``). The reply format is always appended, so replies still parse.
    An add's own ``prompt`` wins over `fact_extraction`."""

    fact_extraction: str | None = Field(default=None, min_length=1, max_length=20_000,
                                        description="Instructions of the extract stage.")
    update_memory: str | None = Field(default=None, min_length=1, max_length=20_000,
                                      description="Instructions of the decide stage (ADD/UPDATE/DELETE/NONE).")


class PipelineSettings(_Group):
    """What the add pipeline does beyond Mem0's steps."""

    temporal_grounding: bool = Field(default=True, description="Each memory keeps ``occurred_at``, the date its "
                                     "fact refers to (relative dates resolved against the job's timestamp), so "
                                     "searches can take a time range; false: no date is asked for or stored.")


class RerankSettings(_Group):
    """An optional rerank step after a search's vector hits (off while `model` is unset).

    `model` is any litellm rerank model (``cohere/rerank-v3.5``, ``jina_ai/...``, ``infinity/...``),
    called through `litellm.rerank`, or ``cross-encoder:<name or folder>`` for a local
    sentence-transformers cross-encoder when one is installed (the ``local`` extra).
    """

    model: str | None = Field(default=None, min_length=1, description="Rerank model; None: no rerank step.")
    api_base: str | None = None
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=30.0, gt=0, description="Seconds one rerank call may take.")
    candidates: int = Field(default=50, ge=1, le=1000, description="Vector hits the reranker reorders (at "
                            "least the search's limit); the best `limit` of them are returned.")


class MetricsSettings(_Group):
    """Prometheus metrics served by each worker process (`memq.metrics`, `broker.queue_metrics`)."""

    port: int = Field(default=9464, ge=0, le=65535, description="Port of the worker's /metrics; 0: none. A second "
                      "worker on the host finds it taken and serves none (a warning): give each its own.")
    host: str = Field(default="127.0.0.1", description="Address the metrics server binds (0.0.0.0 for a Prometheus "
                      "on another host or container).")


class FlowerSettings(_Group):
    """Flower as ``memq flower`` starts it (against the configured broker)."""

    basic_auth: SecretStr | None = Field(default=None, description="``user:password`` for the UI, the API and "
                                         "/metrics; without it Flower binds 127.0.0.1 only.")
    port: int = Field(default=5555, ge=1, le=65535)
    address: str = Field(default="127.0.0.1", description="Address Flower binds (0.0.0.0 needs basic_auth).")


class LogSettings(_Group):
    """How workers log."""

    format: Literal["text", "json"] = Field(default="text", description="``json``: one JSON object per line with "
                                            "job_id, stage and scope_key (`memq.logs`); ``text``: Celery's format.")


class EmbedderSettings(_Group):
    """Embedding model: sentence-transformers all-MiniLM-L6-v2 offline by default, or a litellm model."""

    model: str = DEFAULT_EMBEDDER
    dims: int = 384
    api_base: str | None = None
    api_key: SecretStr | None = None
    batch_size: int = Field(default=16, gt=0, description=(
        "Texts per forward pass of the offline model; a call's texts are sorted by length first, so small "
        "batches pad little (here: 40 sentences of 9-60 tokens cost 0.54 CPU s at 16, 0.89 s at 64; 400 "
        "sentences about the same at either)."))
    threads: int | None = Field(default=None, description="torch threads for the offline model (None: default).")
    passes: int | None = Field(default=None, gt=0, description=(
        "Forward passes of the offline model that may run at once, each shared by the calls waiting when it "
        "starts (None: the cores left by torch's threads, os.cpu_count() // torch threads, at least 1)."))
    precision: Literal["auto", "float32", "bfloat16"] = Field(default="auto", description=(
        "Arithmetic of the offline model's forward passes: bfloat16 runs them under torch's CPU autocast "
        "(float32 weights, accumulation and normalisation; 2.65x less CPU here, every vector within cosine "
        "0.9999 of its float32 one: bench/embed_precision.py); auto: bfloat16 on a CPU with native bfloat16 "
        "(AVX512-BF16 or AMX), else float32."))
    cache_texts: int = Field(default=4096, ge=0, description=(
        "Texts whose vectors a worker keeps, least recently used first out (stores.embed_cache): the offline "
        "decider embeds again the facts extract just embedded and the memories it compares them with (on "
        "LoCoMo conv-26: 2,117 texts against extract's 599), and a hosted model is paid per text. 8 bytes a "
        "dimension: 4,096 texts of 384 dims take ~13 MB. 0: no cache."))
    processes: bool = Field(default=False, description=(
        "Run the offline model's forward passes in child processes (`passes` of them, started on first use), "
        "so a pass never waits for the calling process's GIL (stores.embed_process)."))


class LimitsSettings(_Group):
    """Limits on what a caller may send: add requests (checked by the producer before anything is
    enqueued) and reads (search, get_all). A value over its limit raises a named `InvalidRequest`."""

    max_message_chars: int = Field(default=20_000, gt=0, description="Text characters of one message.")
    max_messages: int = Field(default=500, gt=0, description="Messages in one add.")
    max_content_parts: int = Field(default=100, gt=0, description="Text and image parts of one message.")
    max_scope_id_chars: int = Field(default=128, gt=0, description="Characters of a user_id, agent_id or run_id.")
    max_metadata_bytes: int = Field(default=16_384, gt=0, description="Metadata size as UTF-8 JSON.")
    max_metadata_depth: int = Field(
        default=32, gt=0, le=100,
        description="Nesting levels of metadata objects and arrays (``{\"a\": 1}`` is 1). The worker parses "
                    "the stored job with pydantic-core, whose JSON parser refuses documents nested deeper than "
                    "about 200 levels, and the job wraps metadata a few levels down: 100 at most keeps a margin.")
    max_name_chars: int = Field(default=256, gt=0, description="Characters of a message's `name` (the speaker, "
                                "stored as each memory's actor_id and in every history row).")
    max_message_id_chars: int = Field(default=256, gt=0, description="Characters of a message's `id` (provenance, "
                                      "copied into every memory's source_message_ids).")
    max_prompt_chars: int = Field(default=20_000, gt=0, description="Characters of a custom extraction prompt "
                                  "(about 5k tokens; the built-in prompt is under 1,100 characters).")
    max_image_url_chars: int = Field(
        default=2_000_000, gt=0,
        description="Characters of one image URL. http(s) URLs are short; a base64 ``data:`` URL is 4/3 of the "
                    "image's bytes, so this admits a ~1.5 MB image, more than a vision model keeps (they "
                    "downscale to about 2048 px). The request is stored in Redis and re-read by every stage: "
                    "pass bigger images by http(s) URL.")
    max_image_bytes: int = Field(default=1_450_000, gt=0, description="Decoded bytes of one ``data:`` image "
                                 "(the producer decodes it and checks its type; its base64 stays under "
                                 "`max_image_url_chars`).")
    max_images: int = Field(default=32, gt=0, description="Image parts in one add: bounds the vision calls, "
                            "tokens and downloads one request can cost (at 765 tokens an image, ~25k tokens).")
    max_caption_chars: int = Field(default=2_000, gt=0, description="Characters of a caption or alt text supplied "
                                   "on an image part.")
    max_request_chars: int = Field(
        default=200_000, gt=0,
        description="Characters of text in one add: every message's text, name and id, plus the prompt. The "
                    "extract stage sends it all to the model in one call: ~50k tokens at ~4 characters a token "
                    "leaves room for instructions and the reply in a 128k-token context.")
    max_request_image_url_chars: int = Field(
        default=8_000_000, gt=0,
        description="Characters of all image URLs of one add together (four ``data:`` URLs at the per-image "
                    "limit): bounds the job stored in Redis, which every stage re-reads.")
    max_idempotency_key_chars: int = Field(default=512, gt=0, description="Characters of an idempotency key.")
    max_query_chars: int = Field(default=8_000, gt=0, description="Characters of a search query (one embedding "
                                 "input; API embedders take at most ~8k tokens, the offline one reads 256).")


class JobSettings(_Group):
    """Job records and search defaults."""

    ttl_s: int = Field(default=7 * 24 * 3600, gt=0, description="How long job records stay in Redis.")
    neighbours_top_k: int = Field(default=5, gt=0, description="Existing memories shown to the decider per fact.")
    retry_backoff_max_s: int = Field(default=60, gt=0, description="Longest wait between two retries of a stage.")
    broker_outage_s: float = Field(
        default=120.0, ge=0, description="How long a worker keeps retrying a job-record call while Redis is "
        "unreachable (a restart) before leaving the task's message for redelivery; below the visibility timeout.")
    scope_wait_max_s: float = Field(
        default=30.0, gt=0, description="Longest backstop wait of a decide waiting for its scope's turn (it is "
        "woken as soon as the job before it finishes; the backstop only covers a lost wake-up).")
    rescue_after_s: float = Field(
        default=60.0, gt=0, description="A job unchanged this long whose next task message is in no queue and "
        "held by no worker (lost with a worker killed while taking it) has that task queued again.")
    rescue_every_s: float = Field(
        default=15.0, ge=0, description="How often one of the workers looks for such jobs (0: never).")
    rescue_max: int = Field(
        default=3, ge=0, description="Rescues of a job without progress in between; one more lost message ends "
        "it as failed (MessageLost, a dead letter kept for replay).")
    rate_limit_budget_s: float = Field(
        default=86_400.0, gt=0, description="How long a stage may stay rate-limited (the shared limiter's waits "
        "and the provider's 429s, which never count as attempts), from its first rate-limit, before the job "
        "fails with RateLimitBudgetExceeded and a dead letter; a finished stage starts it again.")


class _MemqDotEnv(DotEnvSettingsSource):
    """A ``.env`` file's ``MEMQ_*`` lines only: the file may hold other tools' variables (``OPENAI_API_KEY``,
    compose's ``POSTGRES_PASSWORD``), which are not memq's to refuse."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        loaded = super()._load_env_vars()
        return {k: v for k, v in loaded.items() if k.lower().startswith("memq_")}


class Settings(BaseSettings):
    """All memq settings. Read from ``MEMQ_*`` variables (and the ``MEMQ_*`` lines of a ``.env`` file if present)."""

    model_config = SettingsConfigDict(
        env_prefix="MEMQ_", env_nested_delimiter="__", extra="forbid", frozen=True, env_file=".env"
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments, then ``MEMQ_*`` variables, then the ``.env`` file's ``MEMQ_*`` lines, then secrets."""
        dotenv = _MemqDotEnv(settings_cls, env_file=getattr(dotenv_settings, "env_file", ".env"))
        return init_settings, env_settings, dotenv, file_secret_settings

    data_dir: Path = Path(".memq")
    redis: RedisSettings = RedisSettings()
    qdrant: QdrantSettings = QdrantSettings()
    neo4j: Neo4jSettings = Neo4jSettings()
    history: HistorySettings = HistorySettings()
    llm: LLMSettings = LLMSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    vision: VisionSettings = VisionSettings()
    prompts: PromptSettings = PromptSettings()
    pipeline: PipelineSettings = PipelineSettings()
    rerank: RerankSettings = RerankSettings()
    metrics: MetricsSettings = MetricsSettings()
    flower: FlowerSettings = FlowerSettings()
    log: LogSettings = LogSettings()
    limits: LimitsSettings = LimitsSettings()
    jobs: JobSettings = JobSettings()

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        if self.qdrant.url is None and self.qdrant.path is None:
            object.__setattr__(self, "qdrant", self.qdrant.model_copy(update={"path": self.data_dir / "qdrant"}))
        if self.history.url is None:
            url = f"sqlite:///{(self.data_dir / 'history.db').as_posix()}"
            object.__setattr__(self, "history", self.history.model_copy(update={"url": url}))
        return self

    @property
    def embedded_qdrant(self) -> bool:
        """True when the vector store is the embedded Qdrant Edge store owned by the worker (no server URL)."""
        return self.qdrant.url is None


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """Build the process-wide settings once from the environment.

    Returns:
        The frozen `Settings`.

    Raises:
        InvalidSettings: a ``MEMQ_*`` variable (or ``.env`` line) has a bad value or an unknown name;
            the message names each variable, never its value (it may be a secret).
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise InvalidSettings(settings_problems(exc)) from None
    except SettingsError as exc:  # a nested group's value that is not JSON, e.g. MEMQ_REDIS=x
        field = re.search(r'field "([^"]+)"', str(exc))
        name = f"MEMQ_{field.group(1).upper()}" if field else "a MEMQ_ variable"
        raise InvalidSettings([f"{name}: not valid JSON (a list or group is written as JSON, e.g. "
                               '\'["10.8.0.0/16"]\'; or set its fields one by one with __)']) from None


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per bad setting: ``MEMQ_LLM__TIMEOUT_S: Input should be a valid number``. A value is never
    repeated (it may be a secret): a message quoting it is replaced by its kind."""
    lines = []
    for error in exc.errors():
        name = "MEMQ_" + "__".join(str(part) for part in error["loc"]).upper()
        given = error.get("input")
        if error["type"] == "extra_forbidden":
            lines.append(f"{name}: not a memq setting (misspelled? see the README's Configuration)")
        elif isinstance(given, str) and given and given in error["msg"] or error["type"] == "value_error":
            lines.append(f"{name}: invalid value ({error['type']})")
        else:
            lines.append(f"{name}: {error['msg']}")
    return lines


class Queues:
    """Celery queue names by kind of work (routes live in `celeryconfig.py`)."""

    LIGHT = "memq.light"
    """Job start-up and other light bookkeeping."""
    LLM = "memq.llm"
    """Stages that call a model: caption, extract, decide."""
    WRITE = "memq.write"
    """Store writes and finalize."""

    ALL = (LIGHT, LLM, WRITE)

    ROUTES = {
        "memq.start": LIGHT,
        "memq.caption": LLM,
        "memq.extract": LLM,
        "memq.decide": LLM,
        "memq.write_vectors": WRITE,
        "memq.write_graph": WRITE,
        "memq.finalize": WRITE,
    }
    """Queue of each task (celeryconfig's ``task_routes`` and the messages memq builds use it)."""
