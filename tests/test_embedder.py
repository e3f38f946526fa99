"""The offline embedder shares forward passes between threads and keeps every call's own answer."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from memq.config import EmbedderSettings
from memq.errors import EmbedderUnavailable
from pipeline import packed
from stores.embed_process import EmbedProcesses
from stores.embedder import SentenceTransformerEmbedder, get_embedder, native_bfloat16

SENTENCES = [f"Caroline went to support group number {i} in May." for i in range(40)]


def _embedder() -> SentenceTransformerEmbedder:
    embedder = get_embedder(EmbedderSettings())
    assert isinstance(embedder, SentenceTransformerEmbedder)
    return embedder


def test_concurrent_calls_share_passes_and_each_gets_its_own_vectors() -> None:
    embedder = _embedder()
    alone = {i: embedder.embed(SENTENCES[i:i + 5]) for i in range(0, 40, 5)}
    # Given 8 threads that embed 5 sentences each at the same moment, 3 times over
    start = threading.Barrier(8)
    got: dict[int, list[list[list[float]]]] = {i: [] for i in alone}

    def call(i: int) -> None:
        for _ in range(3):
            start.wait()
            got[i].append(embedder.embed(SENTENCES[i:i + 5]))

    before = embedder.passes
    threads = [threading.Thread(target=call, args=(i,)) for i in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Then each call got the vectors of its own sentences, in order, as when it ran alone
    for i, answers in got.items():
        assert len(answers) == 3
        for vectors in answers:
            assert np.allclose(np.array(vectors), np.array(alone[i]), atol=1e-5)
    # And the 24 calls took fewer passes than calls (callers that arrive during a pass share the next)
    assert embedder.passes - before < 24


def test_a_call_that_fails_in_a_shared_pass_fails_alone() -> None:
    embedder = _embedder()
    start = threading.Barrier(6)
    results: dict[int, Any] = {}

    def call(i: int) -> None:
        texts: list[Any] = [None] if i == 0 else SENTENCES[i:i + 3]
        start.wait()
        try:
            results[i] = embedder.embed(texts)
        except Exception as exc:  # the model's own error for a non-text input
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Then only the bad call got an error; the others got vectors; no thread is left waiting
    assert isinstance(results[0], Exception)
    assert all(isinstance(results[i], list) and len(results[i]) == 3 for i in range(1, 6))
    assert not any(t.is_alive() for t in threads)
    assert embedder.embed(["still serving"]) and len(embedder.embed([])) == 0


@pytest.mark.parametrize("n", [1, 300])
def test_one_call_is_never_split_or_merged_wrongly(n: int) -> None:
    embedder = _embedder()
    texts = [f"fact number {i}" for i in range(n)]
    vectors = embedder.embed(texts)
    assert len(vectors) == n and all(len(v) == 384 for v in vectors)
    assert np.allclose(np.array(vectors[-1]), np.array(embedder.embed([texts[-1]])[0]), atol=1e-5)


def test_passes_run_side_by_side_up_to_the_limit_and_keep_each_answer() -> None:
    class Counting(SentenceTransformerEmbedder):
        def __init__(self, passes: int) -> None:
            super().__init__(threads=1, passes=passes)
            self.now = self.most = 0
            self.lock = threading.Lock()

        def _encode(self, batch: Any) -> None:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                super()._encode(batch)
            finally:
                with self.lock:
                    self.now -= 1

    embedder = Counting(passes=2)
    alone = {i: embedder.embed(SENTENCES[i:i + 5] * 8) for i in range(0, 40, 5)}
    # Given 8 threads embedding 40 sentences each, at once, 3 times over
    start = threading.Barrier(8)
    got: dict[int, list[list[list[float]]]] = {i: [] for i in alone}

    def call(i: int) -> None:
        for _ in range(3):
            start.wait()
            got[i].append(embedder.embed(SENTENCES[i:i + 5] * 8))

    threads = [threading.Thread(target=call, args=(i,)) for i in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # Then two passes ran at once, never more, and every call got its own vectors
    assert embedder.most == 2
    for i, answers in got.items():
        assert len(answers) == 3
        for vectors in answers:
            assert np.allclose(np.array(vectors), np.array(alone[i]), atol=1e-5)


VARIED = ["Melanie paints.", "Caroline went to an LGBTQ support group on 7 May 2023 and found it powerful.",
          "Jon lost his job as a banker and decided to open a dance studio of his own in the city centre.",
          "Gina's clothing store opened online in June.", "Nate won his first video game tournament."]


def test_precision_auto_follows_the_cpu_and_a_bad_value_is_refused() -> None:
    # Given the default settings, the precision resolves by what the CPU multiplies natively
    assert _embedder().precision == ("bfloat16" if native_bfloat16() else "float32")
    # And an unknown precision is refused by the settings and by the embedder itself
    with pytest.raises(ValidationError):
        EmbedderSettings(precision="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        SentenceTransformerEmbedder(precision="half")


def test_bfloat16_vectors_stay_close_to_float32_ones_and_to_their_own_alone() -> None:
    exact = get_embedder(EmbedderSettings(precision="float32"))
    fast = get_embedder(EmbedderSettings(precision="bfloat16"))
    assert isinstance(exact, SentenceTransformerEmbedder) and isinstance(fast, SentenceTransformerEmbedder)
    assert (exact.precision, fast.precision) == ("float32", "bfloat16")
    # Given sentences of different lengths (so a shared pass pads them), embedded both ways
    precise, quick = np.array(exact.embed(VARIED)), np.array(fast.embed(VARIED))
    # Then each bfloat16 vector is a unit vector within cosine 0.9995 of its float32 one
    assert np.allclose(np.linalg.norm(quick, axis=1), 1.0, atol=1e-4)
    assert (precise * quick).sum(axis=1).min() > 0.9995
    # And a sentence embedded alone in bfloat16 matches its vector from the padded batch
    for i, text in enumerate(VARIED):
        assert float(np.dot(fast.embed([text])[0], quick[i])) > 0.9995
    # And texts stay told apart: each vector is nearest its own float32 vector
    assert list(np.argmax(quick @ precise.T, axis=1)) == list(range(len(VARIED)))


def test_packed_vectors_round_trip_and_bad_ones_are_refused() -> None:
    rows = [[0.1, -2.5, 3.0], [1e-7, 0.0, -1.0]]
    text = packed.pack(rows)
    # float32 keeps every value to float32's precision, row by row
    assert np.allclose(packed.unpack(text, 2), rows, rtol=1e-7, atol=0)
    assert packed.pack([]) == "" and packed.unpack("", 0) == []
    with pytest.raises(ValueError):
        packed.unpack(text, 4)  # 6 floats do not make 4 rows
    with pytest.raises(ValueError):
        packed.unpack("not base64!", 1)


def test_passes_in_a_child_process_match_the_model_in_process_and_outlive_a_killed_child() -> None:
    inproc = get_embedder(EmbedderSettings(precision="float32"))
    embedder = SentenceTransformerEmbedder(threads=1, passes=1, precision="float32", processes=True)
    assert embedder.processes and embedder._children is not None
    try:
        # The child's vectors are the in-process model's
        assert np.allclose(np.array(embedder.embed(VARIED)), np.array(inproc.embed(VARIED)), atol=1e-5)
        # A text the model refuses fails its call alone; the child stays up
        with pytest.raises(ValueError):
            embedder.embed([None])  # type: ignore[list-item]
        [(child, _)] = list(embedder._children._idle.queue)
        assert embedder.embed(["still here"]) and child.poll() is None
        # When the child is killed, the call in flight gets a named error, and the next call a new child
        child.kill()
        child.wait(10)
        with pytest.raises(EmbedderUnavailable):
            embedder.embed(["lost"])
        assert np.allclose(np.array(embedder.embed(VARIED)), np.array(inproc.embed(VARIED)), atol=1e-5)
    finally:
        embedder._children.close()


def test_child_embedding_processes_end_when_their_parent_is_killed(tmp_path: Any) -> None:
    script = (
        "import os, signal\n"
        "from stores.embedder import SentenceTransformerEmbedder\n"
        "e = SentenceTransformerEmbedder(threads=1, passes=2, processes=True)\n"
        "e.embed(['a', 'b'])\n"
        "import time; deadline = time.monotonic() + 120\n"  # both children loaded (slow on a busy machine)
        "while len(e._children._idle.queue) < 2 and time.monotonic() < deadline: time.sleep(0.1)\n"
        "print(' '.join(str(p.pid) for p, _ in list(e._children._idle.queue)), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    # Given a process whose embedder runs two children, killed by SIGKILL (no cleanup runs)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    pids = [int(p) for p in done.stdout.split()]
    assert done.returncode == -signal.SIGKILL and len(pids) == 2, done.stderr[-2000:]
    # Then both children exit on their own (their socket's EOF)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_child_that_fails_to_start_while_a_caller_waits_leaves_the_call_to_the_other_child() -> None:
    class FirstStartFails(EmbedProcesses):
        def __init__(self) -> None:
            super().__init__(2, batch_size=16, threads=1, precision="float32")
            self.spawns = 0

        def _spawn(self) -> Any:
            self.spawns += 1
            if self.spawns == 1:
                raise EmbedderUnavailable("this child could not start")
            return super()._spawn()

    children = FirstStartFails()
    answer: list[Any] = []
    # Given two children started at the first call, one of which fails at once while the call waits
    caller = threading.Thread(target=lambda: answer.append(children.encode(["Caroline paints."])), daemon=True)
    caller.start()
    caller.join(120)
    try:
        # Then the call is answered by the child that started (it neither hangs nor fails)
        assert not caller.is_alive() and len(answer) == 1 and answer[0].shape == (1, 384)
    finally:
        children.close()
