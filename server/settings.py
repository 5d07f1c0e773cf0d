"""The one place that reads the environment: every setting is an env var (DIT_*) and a CLI flag.

List settings take either form from the environment: `DIT_API_KEYS=key1,key2` or the JSON
`DIT_API_KEYS='["key1", "key2"]'` (for an item that holds a comma). An empty variable counts as unset,
so `DIT_VAE=` in a compose file means "no VAE", not the path "".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = PROJECT_ROOT / "weights" / "fashion_dit.safetensors"
# Where data lives by default: $XDG_DATA_HOME/dit-serve (~/.local/share/dit-serve), never the source tree.
DATA_DIR = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "dit-serve"


def _list_from_text(value: object) -> object:
    """`a,b` or JSON `["a", "b"]` (the environment gives text; the CLI and Python give lists)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON list ({e}); write a,b or [\"a\", \"b\"]") from None
    return [item.strip() for item in text.split(",") if item.strip()]


# List settings: NoDecode hands the raw env text to _list_from_text instead of requiring JSON.
StrList = Annotated[list[str], NoDecode, BeforeValidator(_list_from_text)]
IntList = Annotated[list[int], NoDecode, BeforeValidator(_list_from_text)]


class Settings(BaseSettings):
    """dit-serve: class-conditional image generation with DiT over HTTP."""

    model_config = SettingsConfigDict(
        env_prefix="DIT_", cli_prog_name="dit-serve", cli_kebab_case=True, cli_show_env_vars=True,
        cli_implicit_flags=True, cli_parse_none_str="none", env_ignore_empty=True, protected_namespaces=(),
    )

    # Model
    model: Path = Field(EMBEDDED_MODEL, description="DiT checkpoint file or diffusers folder; weights/"
                        "fashion_dit.safetensors is the embedded Fashion-MNIST model")
    vae: Path | None = Field(None, description="diffusers AutoencoderKL folder for latent models; none for "
                             "pixel models and diffusers pipeline folders, which bring their own")
    arch: str | None = Field(None, description="DiT preset name (e.g. DiT-XL/2) when the checkpoint names no "
                             "head count")
    num_heads: int | None = Field(None, ge=1, description="attention heads, when neither the checkpoint nor a preset "
                                  "gives them")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; auto = bfloat16 on CUDA, float32 on the CPU")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; none = torch's choice")
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Triton fused LayerNorm/adaLN/residual kernels; auto = on with CUDA")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="replay the forward from CUDA graphs; auto = on with CUDA")
    fp8: Literal["on", "off"] = Field(
        "off", description="FP8 (e4m3) matmuls for the blocks' qkv, proj and fc2 on GPUs with compute capability "
        ">= 8.9 (bf16 on older GPUs, an emulation on the CPU); see model/fp8.py")
    graph_batch_sizes: IntList = Field(
        [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128], description="forward rows captured as CUDA graphs "
        "(a batch runs the smallest size that holds it)")

    # HTTP
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    probe_port: int | None = Field(None, ge=0, le=65535, description="a second port answering only /healthz and "
                                   "/readyz, from a small process at normal priority, so that probes answer under "
                                   "any load; none = off (probes use the main port)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per log line, with "
                                                "the request id; text: plain lines")

    # Security and request hygiene
    api_keys: StrList = Field([], description="accepted API keys (Authorization: Bearer KEY or X-API-Key); "
                              "none = no authentication. Prefer the env var or --api-keys-file to a flag")
    api_keys_file: Path | None = Field(None, description="file with one API key per line (added to --api-keys)")
    open_paths: StrList = Field(["/healthz", "/readyz", "/metrics"], description="paths served without a key "
                                "when API keys are set")
    cors_origins: StrList = Field([], description="origins allowed by CORS; none = CORS off")
    max_body_bytes: int = Field(65536, ge=1024, description="largest request body; beyond, 413")
    body_timeout: float = Field(10.0, gt=0, description="seconds to receive a request body; beyond, 408")
    header_timeout: float = Field(5.0, gt=0, description="seconds a connection may take to send a request's headers "
                                  "(from its opening, or the end of the last answer); beyond, it is closed")
    max_connections: int = Field(2048, ge=1, description="open connections at most (lowered to fit the open-file "
                                 "limit); beyond, a new one closes the one waiting longest for its headers")

    # Webhooks (POST /jobs with webhook_url): off unless both are set, since they make the server call out
    webhook_secret: str | None = Field(None, repr=False, description="Standard Webhooks secret (whsec_ + base64 of "
                                       ">= 24 random bytes) signing webhook deliveries; with API keys, each key's "
                                       "own secret is derived from it (GET /webhooks/secret); none = webhook_url is "
                                       "refused. Prefer the env var")
    webhook_allow_hosts: StrList = Field([], description="hosts webhook_url may name: exact names, or "
                                           "suffixes written .example.com; none = webhook_url is refused")
    webhook_timeout: float = Field(10.0, gt=0, description="seconds one webhook try may take in all (connect, send, "
                                   "the answer's status line); beyond, it is retried")

    # Scheduling
    policy: Literal["continuous", "request", "none"] = Field(
        "continuous", description="batching: continuous (step-level), request (run a batch of requests to "
        "completion) or none (one request at a time)")
    max_batch_rows: int = Field(64, ge=1, description="forward-pass rows in flight at most (a guided sample costs "
                                "2 rows on its guided steps, an unguided one 1)")
    max_queue: int = Field(256, ge=0, description="requests waiting for admission at most; beyond, 429")
    request_timeout: float = Field(120.0, gt=0, description="seconds from arrival to answer; beyond, 504")
    job_timeout: float = Field(3600.0, gt=0, description="seconds an async job (POST /jobs) may take")
    job_ttl: float = Field(600.0, gt=0, description="seconds a finished async job's result is kept")
    data_dir: Path = Field(DATA_DIR, description="where the server keeps its data: the job store (jobs.db, SQLite) "
                           "unless --job-store names another")
    job_store: str | None = Field(None, repr=False, description="the async jobs' database: a SQLAlchemy URL, e.g. "
                                  "postgresql+psycopg://user:password@host/db for a fleet; none = SQLite in "
                                  "--data-dir")
    max_jobs: int = Field(1000, ge=1, description="async jobs held at once (queued, running or finished)")
    max_jobs_per_key: int | None = Field(None, ge=1, description="async jobs one API key may hold at once (queued, "
                                         "running or finished); none = only --max-jobs")
    max_dataset_images: int = Field(50_000, ge=1, description="images one dataset (POST /datasets) may ask for "
                                    "(classes x per_class); 50,000 is the paper's FID-50K")
    max_datasets_per_key: int = Field(2, ge=1, description="datasets one API key may have running at once")
    dataset_ttl: float = Field(7 * 86400.0, gt=0, description="seconds a dataset's shards are kept after it ended")
    max_dataset_bytes: int = Field(20 * 2**30, ge=1, description="bytes of dataset shards kept on disk at most "
                                   "(ended datasets are deleted, oldest first, to make room)")
    judge_data: Path = Field(Path("/usr/share/datasets/fashion-mnist"), description="Fashion-MNIST's test set (IDX "
                             "files) for datasets made with evaluate: true; Debian's dataset-fashion-mnist puts "
                             "it here")
    encode_threads: int = Field(2, ge=1, description="threads encoding images off the device thread")
    warmup: bool = Field(True, description="run a short generation before reporting ready")
    engine: Literal["process", "thread"] = Field(
        "process", description="where the engine (scheduler + model runner) runs: its own process, so that HTTP "
        "load cannot slow the step loop, or a thread of the server's process (the reference)")
    frontend_nice: int = Field(19, ge=0, le=19, description="with the engine in its own process, the HTTP "
                               "process lowers its own scheduling priority by this much (nice); under "
                               "--frontend-sched-idle nice matters only where that policy is missing")
    frontend_sched_idle: bool = Field(True, description="with the engine in its own process, the HTTP process also "
                                      "runs under Linux's SCHED_IDLE policy: the kernel preempts it as soon as an "
                                      "engine thread wakes, which nice alone does not (where the policy is missing, "
                                      "nice alone)")
    deadline_admission: bool = Field(True, description="answer 429 at once when a request could not finish "
                                     "within half the time to its deadline (estimated from the backlog and the "
                                     "measured step time), instead of admitting it")
    max_requests_per_key: int | None = Field(None, ge=1, description="requests one API key may have queued or "
                                             "running at once; beyond, 429 key_quota_exceeded (none = no limit)")
    fault_injection: bool = Field(False, description="TEST ONLY: enable POST /_faults, which makes the model "
                                  "runner fail on purpose")

    # Request limits
    max_steps: int = Field(250, ge=1, le=1000, description="largest steps a request may ask for")
    max_images: int = Field(16, ge=1, description="largest num_images a request may ask for")
    min_cfg_scale: float = Field(1.0, ge=1.0, description="smallest cfg_scale a request may ask for")
    max_cfg_scale: float = Field(20.0, ge=1.0, description="largest cfg_scale a request may ask for")
    cache: str | None = Field(None, description="step cache of the requests that name none: off, a preset "
                              "(model/cache.py), or a JSON object {\"method\": \"reuse\" or \"taylor\", \"every\": N, "
                              "\"order\": 1 or 2, \"warmup\": W} (none = the model's declared default)")

    @property
    def drain_timeout(self) -> float:
        """Seconds a stopping server (or a Ray replica being removed) gives admitted requests to finish:
        the longest a request may take, and a margin for its decode and answer."""
        return self.request_timeout + 10

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_none(cls, value: object) -> object:
        """`--policy none` is the policy's name: the flag parser reads the word `none` as "no value"
        (cli_parse_none_str, which lets `--vae none` unset a path)."""
        return "none" if value is None else value

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, value: str | None) -> str | None:
        from .http.webhooks import NEW_SECRET, secret_problem  # the spec's rules live with the deliveries

        problem = secret_problem(value) if value is not None else None
        if problem:
            raise ValueError(f"not a Standard Webhooks secret: {problem}; make one with: {NEW_SECRET}")
        return value

    @field_validator("cache")
    @classmethod
    def _cache(cls, value: str | None) -> str | None:
        if value is not None:
            cls.parse_cache(value)  # a ValueError that says what would do
        return value

    @staticmethod
    def parse_cache(value: str):
        from model.cache import Cache

        return Cache.parse(json.loads(value) if value.lstrip().startswith("{") else value)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.min_cfg_scale > self.max_cfg_scale:
            raise ValueError("min_cfg_scale must not exceed max_cfg_scale")
        return self
