"""Small helpers shared by tests."""

from __future__ import annotations

import json
from typing import Any

from memq.models import JobStatus, Receipt


def wait_done(producer: Any, receipt: Receipt, timeout_s: float = 90.0) -> JobStatus:
    """Follow one job to succeeded/failed and return its status (fails the test on timeout)."""
    status: JobStatus = producer.wait([receipt], timeout_s=timeout_s, poll_s=0.05)[0]
    assert status.done, f"job {receipt.job_id} still {status.status} after {timeout_s} s"
    return status


def facts_reply(*facts: str | tuple[str, list[int]]) -> str:
    """A scripted extraction reply."""
    items = [{"text": f, "sources": [0]} if isinstance(f, str) else {"text": f[0], "sources": f[1]} for f in facts]
    return json.dumps({"facts": items})


def decisions_reply(*decisions: dict[str, Any]) -> str:
    """A scripted decision reply."""
    return json.dumps({"memory": list(decisions)})
