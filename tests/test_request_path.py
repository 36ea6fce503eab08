"""The per-request machinery kept cheap on the hot path: the batcher's busy rule after a merged
run, the event-loop wait on a batcher ticket (deadline and caller leaving), and the sequence
store's idle sweep that only looks once a sequence can be due."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server import batcher as batcher_module
from server.batcher import Batcher, BatchPolicy
from server.dataplane import _Wait, _wait
from server.errors import DeadlineExceeded, NotFound
from server.runtime import RuntimeOptions, load_model, select_providers
from server.sequences import SequenceStore
from server.validate import validate
from tests.conftest import TOL, ragged


@pytest.fixture(scope="module")
def runtime(repo):
    providers = select_providers(RuntimeOptions(device="cpu"))
    return load_model("bi", 1, repo / "bi" / "1" / "model.onnx", providers, RuntimeOptions(device="cpu"))


def _work(runtime, x, lengths):
    return validate(runtime, {"x": x, "lengths": lengths}, ["h_n"]).work


def _held(runtime, infos):
    """A batcher whose runs wait for `gate` (so requests queue behind a run)."""
    gate = threading.Event()

    def run(feeds, outputs):
        gate.wait(10)
        return runtime.run(feeds, outputs)

    return Batcher("bi:1", run, BatchPolicy(max_queue_delay_us=0), on_batch=infos.append,
                   signature=runtime.signature), gate  # fmt: skip


def test_after_a_merged_run_the_next_requests_wait_for_company(runtime):
    """A merged run ends with nothing queued; the next request (a client of a closed loop whose
    reply just went out) waits for the one arriving right after it instead of running alone; long
    after, a lone request runs at once. Each result is its own request's."""
    infos: list = []
    batcher, gate = _held(runtime, infos)
    rng = np.random.default_rng(5)
    reqs = [ragged(rng, 1, 8, 6) for _ in range(5)]
    first = batcher.submit(_work(runtime, *reqs[0]), inline=False)
    time.sleep(0.1)
    queued = [batcher.submit(_work(runtime, *r), inline=False) for r in reqs[1:3]]
    gate.set()
    for f in [first, *queued]:
        f.result(30)
    assert [i.requests for i in infos] == [1, 2]  # the two queued ones merged
    a = batcher.submit(_work(runtime, *reqs[3]), inline=False)  # the queue is empty, the model idle
    time.sleep(batcher_module.COALESCE_GAP_S / 4)
    b = batcher.submit(_work(runtime, *reqs[4]), inline=False)
    for f, (x, lengths) in zip([a, b], reqs[3:]):
        got = f.result(30)[0]["h_n"]
        assert np.abs(got - runtime.run({"x": x, "lengths": lengths}, ["h_n"])["h_n"]).max() <= TOL
    assert infos[2].requests == 2, [i.requests for i in infos]
    time.sleep(batcher_module.COALESCE_RECENT_S + 0.05)
    t0 = time.monotonic()
    batcher.submit(_work(runtime, *reqs[0]), inline=False).result(30)
    assert infos[3].requests == 1
    assert time.monotonic() - t0 < 1.0
    batcher.close()


def _queued_behind_a_held_run(runtime, infos, seed):
    """A held batcher (`_held`) with one request running (the blocker) and one queued behind it."""
    batcher, gate = _held(runtime, infos)
    rng = np.random.default_rng(seed)
    blocker = batcher.submit(_work(runtime, *ragged(rng, 1, 5, 6)), inline=False)
    time.sleep(0.1)
    queued = batcher.submit(_work(runtime, *ragged(rng, 1, 5, 6)), inline=False)
    return batcher, gate, blocker, queued


def test_loop_wait_on_a_queued_request_expires_and_it_is_not_run(runtime):
    """The loop's wait (`dataplane._wait`) ends at its timeout with the step's DeadlineExceeded, and
    the request, still queued behind a held run, is never run."""
    infos: list = []
    batcher, gate, blocker, queued = _queued_behind_a_held_run(runtime, infos, seed=6)

    async def wait():
        step = _Wait(queued, time.monotonic() - 1, "bi")  # deadline passed: the wait's timeout is its 0.5 s grace
        return await _wait(asyncio.get_running_loop(), step)

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
        asyncio.run(wait())
    assert 0.05 < time.monotonic() - t0 < 5
    assert queued.cancelled()
    gate.set()
    blocker.result(30)
    time.sleep(0.2)
    assert [i.requests for i in infos] == [1]  # the expired request never ran
    batcher.close()


def test_loop_wait_cancelled_by_its_caller_leaves_the_request(runtime):
    """The caller's task is cancelled while its request is queued: CancelledError (not a deadline
    error), and the request is not run."""
    infos: list = []
    batcher, gate, blocker, queued = _queued_behind_a_held_run(runtime, infos, seed=7)

    async def main():
        task = asyncio.ensure_future(_wait(asyncio.get_running_loop(), _Wait(queued, None, "bi")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert queued.cancelled()
    gate.set()
    blocker.result(30)
    time.sleep(0.2)
    assert [i.requests for i in infos] == [1]
    batcher.close()


def test_idle_sweep_frees_each_sequence_once_its_own_timeout_passed():
    """Sequences released at different times are freed each once its idle time passed (the sweep
    skips its scan only while none can be due), and a changed idle timeout is applied at once."""
    store = SequenceStore(max_sequences=10, idle_s=0.5)
    state = {"h0": np.zeros((1, 1, 2), np.float32)}

    def chunk(seq, start=False):
        store.acquire("m", 1, seq, start, state)
        store.release("m", seq, state, False)

    chunk("a", start=True)
    time.sleep(0.25)
    chunk("b", start=True)
    time.sleep(0.35)  # a: 0.6 s idle; b: 0.35 s
    chunk("c", start=True)  # the sweep runs at acquire
    assert store.version_of("m", "a") is None and store.version_of("m", "b") == 1
    with pytest.raises(NotFound, match="freed after"):
        chunk("a")
    time.sleep(0.25)  # b: 0.6 s idle
    chunk("c")
    assert store.version_of("m", "b") is None and store.version_of("m", "c") == 1
    store.idle_s = 0.01  # shorter now: c (just used) is due at the next look after 10 ms
    time.sleep(0.05)
    assert store.sweep() == 1
    assert store.version_of("m", "c") is None
