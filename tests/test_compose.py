"""compose/ without Docker: the file's structure holds what a deployment needs, and every MEMQ_* variable it
sets loads in memq's settings model (a misspelled one would stop every worker at start)."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from memq.config import LLMSettings, Queues, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
WORKERS = {name: s for name, s in SERVICES.items() if name.startswith("worker")}
REQUIRED = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")
DEFAULTED = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")


def _resolved(value: str) -> str:
    """A compose value with ${VAR:?...} given a placeholder and ${VAR:-default} its default."""
    return DEFAULTED.sub(lambda m: m.group(2), REQUIRED.sub("placeholder-secret", value))


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", text)
    assert match, text
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_every_service_restarts_and_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} exposes {port} beyond loopback"


def test_one_worker_service_per_queue_each_stopping_gently_on_a_writable_volume() -> None:
    consumed = []
    for name, worker in WORKERS.items():
        command = worker["command"]
        consumed += command[command.index("--queues") + 1].split(",")
        # Longer than the longest stage: a model call with its in-call retries (jobs.add._lease_s), at the
        # default timeout (the compose file does not change it)
        longest = 4 * LLMSettings().timeout_s + 30
        assert _seconds(worker["stop_grace_period"]) > longest, name
        assert any(v.endswith(":/data") for v in worker["volumes"]), name
    assert sorted(consumed) == sorted(Queues.ALL)
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M) and "chown memq:memq /data" in dockerfile


def test_every_memq_variable_it_sets_loads_in_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in SERVICES.items():
        env = {k: _resolved(str(v)) for k, v in (service.get("environment") or {}).items() if k.startswith("MEMQ_")}
        if not env:
            continue
        for key in [k for k in __import__("os").environ if k.startswith("MEMQ_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.redis.url == "redis://redis:6379/0", name
        if name in WORKERS:
            assert settings.history.url and settings.history.url.startswith("postgresql+psycopg://"), name
            assert settings.qdrant.url == "http://qdrant:6333" and settings.metrics.port == 9464, name
            assert settings.metrics.host == "0.0.0.0", name  # Prometheus scrapes from its own container
    # Flower gets the broker and its own settings only, never a store's password
    assert not {k for k in SERVICES["flower"]["environment"] if "NEO4J" in k or "HISTORY" in k}


def test_secrets_come_from_the_env_file_and_nothing_secret_is_baked_in() -> None:
    text = (ROOT / "compose" / "docker-compose.yml").read_text()
    required = set(REQUIRED.findall(text))
    assert {"POSTGRES_PASSWORD", "NEO4J_PASSWORD", "FLOWER_BASIC_AUTH"} <= required
    assert not re.search(r"(?i)(password|basic_auth)[^$\n]*:-", text), "a secret with a default value"
    example = (ROOT / "compose" / ".env.example").read_text()
    assert required <= set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    assert "compose/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_qdrant_is_pinned_to_the_clients_minor_version_and_prometheus_scrapes_every_worker() -> None:
    image = SERVICES["qdrant"]["image"]
    server_minor = re.fullmatch(r"qdrant/qdrant:v(\d+\.\d+)\.\d+", image)
    assert server_minor and server_minor.group(1) == ".".join(version("qdrant-client").split(".")[:2])
    scrape = yaml.safe_load((ROOT / "compose" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {n for job in scrape for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    ports = {sd["port"] for job in scrape for sd in job.get("dns_sd_configs", [])}
    assert targets == set(WORKERS) and ports == {9464}
    for worker in WORKERS.values():
        assert "local" in worker["build"]["args"]["EXTRAS"] and "postgres" in worker["build"]["args"]["EXTRAS"]
