"""What an operator runs: `memq doctor` names what is down and how to fix it, `memq stats` reads the
queue, a misspelled setting is one line, and task results say in words what a stage did (a wait is
not a failure or a retry)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.messages import Next
from cli.redis_server import RedisServer
from jobs.transitions import Deferred, Retry
from memq.errors import StoreUnavailable

ENV_WIDE = {"COLUMNS": "300", "HF_HUB_OFFLINE": "1"}


def _memq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=120)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_misspelled_or_bad_setting_is_one_line_naming_the_variable() -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEMQ_")}, **ENV_WIDE,
           "MEMQ_LLM__MODLE": "openai/gpt-4o-mini", "MEMQ_JOBS__TTL_S": "s3cr3t-value"}
    run = _memq(env, "stats")
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert sorted(lines) == ["configuration error: MEMQ_JOBS__TTL_S: Input should be a valid integer, unable to "
                             "parse string as an integer",
                             "configuration error: MEMQ_LLM__MODLE: not a memq setting (misspelled? see the "
                             "README's Configuration)"]
    assert "s3cr3t-value" not in run.stderr + run.stdout  # a value may be a secret: never echoed


@pytest.mark.timeout(180)  # several fresh `memq` processes
def test_settings_ignore_other_tools_lines_in_dotenv_and_never_print_a_traceback_or_a_value(tmp_path: Any) -> None:
    base = {**{k: v for k, v in os.environ.items() if not k.startswith("MEMQ_")}, **ENV_WIDE}
    # A .env shared with other tools: their lines are not memq's to refuse; memq's lines still count
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-other-tool\nPOSTGRES_PASSWORD=x\nMEMQ_METRICS__PORT=0\n")
    run = subprocess.run([sys.executable, "-c", "from memq.config import load_settings; "
                          "print('port', load_settings().metrics.port)"], cwd=tmp_path, capture_output=True, text=True,
                         env={**base, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=60)
    assert run.returncode == 0 and "port 0" in run.stdout, run.stderr[-2000:]
    # A group that is not JSON, and a value quoted back by the validator: one line, no traceback, no value
    for name, value in (("MEMQ_REDIS", "s3cr3t-group"), ("MEMQ_VISION__ALLOW_NETWORKS", '["s3cr3t-net/99"]')):
        bad = _memq({**base, name: value}, "stats")
        assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr, bad.stderr[-2000:]
        assert "configuration error: MEMQ_" in bad.stderr and "s3cr3t" not in bad.stdout + bad.stderr


def test_doctor_never_prints_a_password_wherever_the_url_holds_it() -> None:
    from cli.health import _redact

    assert _redact("redis://:pw-a@h:1/0") == "redis://:***@h:1/0"
    assert _redact("redis://h:1/0?password=pw-b") == "redis://h:1/0?password=***"
    assert _redact("postgresql+psycopg://memq:pw-c@db/memq?sslpassword=pw-d&connect_timeout=3") == \
        "postgresql+psycopg://memq:***@db/memq?sslpassword=***&connect_timeout=3"
    assert _redact("bolt://neo4j:pw-e@g:7687") == "bolt://neo4j:***@g:7687"
    assert _redact("sqlite:///.memq/history.db") == "sqlite:///.memq/history.db"


def test_doctor_passes_with_every_service_up_and_stats_read_the_queue(worker: Any, settings: Any,
                                                                      producer: Any) -> None:
    from tests.helpers import wait_done

    wait_done(producer, producer.add("I like flying kites on windy days.", user_id="ops-stats"))  # one model call at least
    env = {**os.environ, **ENV_WIDE}
    run = _memq(env, "doctor")
    assert run.returncode == 0, run.stdout
    for service in ("Redis", "queue memq.light", "queue memq.llm", "queue memq.write", "vector store", "SQL history",
                    "LLM"):
        assert service in run.stdout
    assert "FAIL" not in run.stdout
    stats = _memq(env, "stats", "--json")
    assert stats.returncode == 0, stats.stdout + stats.stderr
    report = json.loads(stats.stdout)
    assert set(report["queues"]) == {"memq.light", "memq.llm", "memq.write"}
    assert report["jobs_by_state"].get("succeeded", 0) >= 1 and report["dead_letters"] >= 0
    # And the model usage comes from the worker's metrics (the session worker serves them in this process)
    assert report["llm_usage"] is not None and "openai/test-model" in report["llm_usage"]
    assert report["llm_usage"]["openai/test-model"].get("calls_ok", 0) >= 1


@pytest.mark.timeout(180)  # several fresh `memq` processes
def test_doctor_names_a_stopped_redis_and_an_unreachable_neo4j_precisely(settings: Any) -> None:
    server = RedisServer()
    server.start()
    url = server.url
    server.stop()
    bolt = f"bolt://127.0.0.1:{_closed_port()}"
    env = {**os.environ, **ENV_WIDE, "MEMQ_REDIS__URL": url, "MEMQ_NEO4J__URI": bolt,
           "MEMQ_NEO4J__PASSWORD": "not-shown-anywhere"}
    run = _memq(env, "doctor")
    assert run.returncode == 1
    rows = {line.split("│")[2].strip(): line for line in run.stdout.splitlines() if line.count("│") >= 4}
    assert "FAIL" in rows["Redis"] and url in rows["Redis"] and "start Redis at" in rows["Redis"]
    assert "FAIL" in rows["Neo4j"] and bolt in rows["Neo4j"] and "start Neo4j at" in rows["Neo4j"]
    assert "not-shown-anywhere" not in run.stdout + run.stderr


def test_task_results_say_what_the_stage_did_and_a_wait_is_not_a_failure() -> None:
    from workers.tasks import outcome_label

    assert outcome_label(Deferred(Next("memq.decide"), backstop_s=2.0), "deferred").startswith(
        "waiting for the scope's turn")
    assert outcome_label(Retry(Next("memq.extract", countdown_s=1.5, retries=0)), "ok").startswith("waiting 1.5 s")
    assert outcome_label(Deferred(Next("memq.decide"), backstop_s=2.0), "now").startswith("its scope's turn came")
    failing = Retry(Next("memq.write_graph", countdown_s=3.0, retries=2), error=StoreUnavailable("Neo4j down"))
    assert outcome_label(failing, "ok") == "retry 2 in 3.0 s: StoreUnavailable"
    assert outcome_label(failing, "finished") == "nothing to do: the job had ended"


@pytest.mark.timeout(180)  # several fresh `memq` processes
def test_memq_flower_guards_metrics_with_its_basic_auth_and_refuses_an_open_bind(settings: Any) -> None:
    import base64
    import time
    import urllib.error
    import urllib.request

    port = _closed_port()
    env = {**os.environ, **ENV_WIDE, "MEMQ_FLOWER__BASIC_AUTH": "ops:s3cret-pass", "MEMQ_FLOWER__PORT": str(port)}
    unguarded = {k: v for k, v in env.items() if k != "MEMQ_FLOWER__BASIC_AUTH"} | {"MEMQ_FLOWER__ADDRESS": "0.0.0.0"}
    refused = _memq(unguarded, "flower")
    assert refused.returncode == 2 and "MEMQ_FLOWER__BASIC_AUTH" in refused.stdout
    # A comma would give Flower two logins (it splits on commas)
    comma = _memq({**env, "MEMQ_FLOWER__BASIC_AUTH": "ops:a,b"}, "flower")
    assert comma.returncode == 2 and "comma" in comma.stdout
    # When memq flower starts with basic auth on a loopback port

    # (Flower's own variables from the environment are dropped: they would bypass memq's checks)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "flower"], env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def status(path: str, auth: bool) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if auth:
                request.add_header("Authorization", "Basic " + base64.b64encode(b"ops:s3cret-pass").decode())
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    return int(reply.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)
            except OSError:
                return 0

        deadline = time.monotonic() + 60
        while status("/healthcheck", False) != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "flower did not start"
            time.sleep(0.5)
        # Then /metrics, like the UI and the API, needs the credentials
        assert status("/metrics", False) == 401 and status("/metrics", True) == 200
        assert status("/api/workers", False) == 401 and status("/api/workers", True) == 200
        # And the password is not on Flower's command line (visible to every user in `ps`)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
            assert b"s3cret-pass" not in cmdline.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
