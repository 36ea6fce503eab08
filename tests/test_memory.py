"""Bounded memory under hostile clients: the memory budget, per-connection limits, REST head and
pipelining limits, per-client sequence shares, clipped client strings, the metrics port.

The attacks run against a real `python -m server` process on loopback (RSS read from
/proc/PID/status), each for a few seconds and with its RSS bound asserted; raw HTTP/2 (h2) and raw
sockets do what grpcio and http.client never let a client do (a zero receive window, a request
head that never ends, pipelining without reading).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import numpy as np
import pytest

from export.model import LSTMConfig, LSTMEncoder
from export.onnx_export import export_dynamic
from scale.replicas import free_port, start_process
from server.codec import encode_input
from server.errors import ResourceExhausted
from server.memory import MIB, MemoryBudget, call_cost, step_bytes, working_bytes
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.sequences import SequenceStore

ROOT = Path(__file__).resolve().parents[1]
MID = LSTMConfig(input_size=80, hidden_size=128, num_layers=2, bidirectional=True)  # 9,920 B per step
BUDGET_MB = 300


# -- the budget, no sockets ---------------------------------------------------------------------------
def test_budget_waits_for_room_then_grants_in_order():
    async def run():
        budget = MemoryBudget(100 * MIB, client_share=0.6, wait_s=5)
        a = await budget.hold(50 * MIB, "a")
        b = await budget.hold(40 * MIB, "b")
        waiting = asyncio.ensure_future(budget.hold(30 * MIB, "c"))  # 120 > 100: waits
        await asyncio.sleep(0.05)
        assert not waiting.done() and budget.held == 90 * MIB
        a.release()
        a.release()  # idempotent
        c = await asyncio.wait_for(waiting, 1)
        assert budget.held == 70 * MIB and budget.by_client == {"b": 40 * MIB, "c": 30 * MIB}
        b.release(), c.release()
        assert budget.held == 0 and budget.by_client == {}

    asyncio.run(run())


def test_budget_refuses_what_never_fits_and_times_out_naming_the_budget():
    async def run():
        budget = MemoryBudget(100 * MIB, client_share=0.5, wait_s=0.2)
        with pytest.raises(ResourceExhausted, match=r"whole memory budget of 100 MiB \(--memory-budget-mb 100\)"):
            await budget.hold(101 * MIB, "a")
        with pytest.raises(ResourceExhausted, match="per-client share of 50 MiB"):
            await budget.hold(60 * MIB, "a")
        first = await budget.hold(45 * MIB, "a")
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted, match=r"memory budget full: .* this client 45 of its 50 MiB share"):
            await budget.hold(10 * MIB, "a")  # a's share is full: waits 0.2 s, then refused
        assert 0.15 < time.monotonic() - t0 < 2
        other = await asyncio.wait_for(budget.hold(45 * MIB, "b"), 0.1)  # another client is not held up
        deadline = time.monotonic() + 0.1  # a deadline bounds the wait instead of wait_s
        with pytest.raises(ResourceExhausted, match="waited 0.1 s"):
            await budget.hold(20 * MIB, "c", deadline)
        first.release(), other.release()
        assert budget.held == 0 and budget.refused == 4

    asyncio.run(run())


def test_budget_cancelled_waiter_holds_nothing():
    async def run():
        budget = MemoryBudget(10 * MIB, client_share=1.0, wait_s=5)
        full = await budget.hold(10 * MIB, "a")
        waiting = asyncio.ensure_future(budget.hold(5 * MIB, "b"))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        full.release()
        assert budget.held == 0 and not budget._waiters

    asyncio.run(run())


def test_sequence_slots_are_shared_per_client():
    store = SequenceStore(max_sequences=8, idle_s=60, client_share=0.25)
    zeros = np.zeros((1, 1, 2), np.float32)
    for i in range(2):
        store.acquire("m", 1, f"a{i}", True, {"h0": zeros}, client="attacker")
        store.release("m", f"a{i}", {"h0": zeros}, False)
    with pytest.raises(ResourceExhausted, match=r"its share of the 8 slots \(--sequence-client-share 0.25 = 2\)"):
        store.acquire("m", 1, "a2", True, {"h0": zeros}, client="attacker")
    store.acquire("m", 1, "a0", True, {"h0": zeros}, client="attacker")  # restarting its own: no new slot
    store.release("m", "a0", {"h0": zeros}, False)
    for i in range(6):  # the others still get every other slot
        store.acquire("m", 1, f"h{i}", True, {"h0": zeros}, client=f"honest{i % 3}")
        store.release("m", f"h{i}", {"h0": zeros}, False)
    assert len(store) == 8


# -- ONNX Runtime's working memory: the estimate against a measurement ----------------------------------
_MEASURE = """
import json, sys
import numpy as np, onnxruntime as ort
from server.runtime import ModelRuntime
from server.memory import run_options, working_bytes
def rss():
    d = {k: int(v.split()[0]) * 1024 for k, _, v in (ln.partition(":") for ln in open("/proc/self/status"))
         if k in ("VmRSS", "VmHWM")}
    return d["VmRSS"], d["VmHWM"]
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
B, T = 8, 1500
x = np.zeros((B, T, 80), np.float32)
feeds = {"x": x, "lengths": np.full(B, T, np.int64)}
class Rt:  # what working_bytes reads of a ModelRuntime
    export_metadata = dict(s.get_modelmeta().custom_metadata_map); static_length = None
est = working_bytes(Rt, x.nbytes, B, T)
base = rss()[0]
open("/proc/self/clear_refs", "w").write("5")
s.run(["h_n"], feeds, run_options(est))
after, peak = rss()
print(json.dumps({"estimate": est, "peak": peak - base, "after": after - base}))
"""


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mid") / "mid" / "1" / "model.onnx"
    export_dynamic(LSTMEncoder(MID).eval(), path, verify=False)
    return path


def test_working_memory_estimate_covers_ort_and_arena_is_returned(mid_model):
    """ORT's peak for a 12,000-step run of a 2x2x128 LSTM is within the estimate (and not far
    below it), and the arena shrinkage after a large run returns what it grew by."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(mid_model)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"mid model 8 x 1500 steps: estimate {m['estimate'] / MIB:.0f} MiB, ORT peak {m['peak'] / MIB:.0f} MiB, "
          f"held after {m['after'] / MIB:.0f} MiB")  # fmt: skip
    assert m["peak"] <= m["estimate"] <= 2 * m["peak"] + 16 * MIB
    assert m["after"] < 0.25 * m["peak"]  # the arena gave back what the run grew it by


def test_cost_counts_request_working_memory_and_response(repo):
    from server.repository import probe_output_layout
    from server.runtime import RuntimeOptions, load_model, select_providers

    rt = load_model("bi", 1, repo / "bi" / "1" / "model.onnx", select_providers(RuntimeOptions(device="cpu")),
                    RuntimeOptions(device="cpu"))  # fmt: skip
    probe_output_layout(rt)  # as the repository does when a version loads
    x = np.zeros((3, 50, 6), np.float32)
    cost = call_cost(rt, {"x": x}, ["y"])
    assert cost.request == x.nbytes
    assert cost.working == step_bytes(rt) * 150 == working_bytes(rt, x.nbytes, 3, 50)
    assert cost.response == 3 * 50 * 16 * 4  # y: (batch, time, 2 x 8) float32
    assert call_cost(rt, {"x": x}, ["h_n"]).response == 4 * 3 * 8 * 4  # (L*D, batch, H)


# -- a real server, attacked ---------------------------------------------------------------------------
def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads")


class Served:
    def __init__(self, replica, http: int, metrics: int) -> None:
        self.proc, self.port, self.log = replica.proc, replica.port, replica.log
        self.http, self.metrics = http, metrics
        self.target = f"127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
        assert values, name
        return values[0]

    def rss(self) -> float:
        return _rss_mib(self.proc.pid)


@pytest.fixture(scope="module")
def served(repo, mid_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("memrepo")
    for name in ("uni", "suni"):
        shutil.copytree(repo / name, root / name)
    shutil.copytree(mid_model.parents[1], root / "mid")
    http, metrics = free_port(), free_port()
    replica = start_process([
        "-m", "server", "--model-repository", str(root), "--port", "0", "--device", "cpu",
        "--http-port", str(http), "--metrics-port", str(metrics), "--log-level", "INFO",
        "--memory-budget-mb", str(BUDGET_MB), "--memory-client-share", "0.5", "--memory-wait-s", "1",
        "--max-streams-per-connection", "16", "--max-connection-age-s", "3", "--connection-age-grace-s", "1",
        "--send-timeout-s", "2", "--max-sequences", "40", "--sequence-client-share", "0.25",
        "--intra-op-threads", "1",
    ])  # fmt: skip
    s = Served(replica, http, metrics)
    yield s
    s.proc.terminate()
    s.proc.wait(30)
    assert not [ln for ln in s.log if " ERROR " in ln or "Traceback" in ln], "".join(s.log[-40:])


def _request(model: str, x: np.ndarray, outputs=("h_n",)) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    encode_input(req, "x", x)
    for name in outputs:
        req.outputs.add(name=name)
    return req


def _channel(target: str) -> grpc.Channel:
    """A channel with a connection of its own (grpcio shares one between equal channels otherwise)."""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
               ("grpc.use_local_subchannel_pool", 1)]  # fmt: skip
    return grpc.insecure_channel(target, options=options)


def test_budget_logged_at_start(served):
    assert any(f"memory budget {BUDGET_MB} MiB (--memory-budget-mb)" in ln for ln in served.log), served.log[:20]
    assert served.metric("lstm_memory_budget_bytes") == BUDGET_MB * MIB


def test_big_request_refused_before_it_runs_and_arena_returned(served):
    """One request within the message limits whose working memory exceeds the budget is refused at
    once; one within it runs, and ORT's arena gives back what it grew by."""
    base = served.rss()
    with _channel(served.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # 4 x 20,000 steps: ~790 MiB of working memory
            stub.ModelInfer(_request("mid", np.zeros((4, 20000, 80), np.float32)), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"whole memory budget of {BUDGET_MB} MiB (--memory-budget-mb" in err.value.details()
        assert time.monotonic() - t0 < 5 and served.rss() < base + 100
        with pytest.raises(grpc.RpcError) as err:  # 4 x 5,000 steps: 190 MiB, over one client's 150
            stub.ModelInfer(_request("mid", np.zeros((4, 5000, 80), np.float32)), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per-client share" in err.value.details()
        base = served.rss()  # what the refused requests' messages left in the heap is not ORT's
        peak = [base]
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], served.rss())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        stub.ModelInfer(_request("mid", np.zeros((4, 3000, 80), np.float32)), timeout=60)  # ~114 MiB estimated
        done.set()
        watcher.join()
    time.sleep(0.3)
    after = served.rss()
    print(f"big request: RSS {base:.0f} MiB before, peak {peak[0]:.0f}, after {after:.0f}")
    assert peak[0] < base + 200 and after < base + 40
    assert served.metric("lstm_memory_held_bytes") == 0


class _H2:
    """A raw HTTP/2 gRPC client (h2): its SETTINGS and flow-control windows are its own."""

    def __init__(self, port: int, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sock.sendall(self.conn.data_to_send())
        self.closed, self.goaway, self.ended = False, False, 0
        self.max_streams = None
        self.pending: list[list] = []  # [stream id, body bytes not sent yet]

    def pump(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:  # frames after a GOAWAY (h2 closed its state on it)
            self.goaway = True
            return
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = True
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended += 1
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                setting = ev.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                self.max_streams = setting.new_value if setting else self.max_streams
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def call(self, port: int, message: bytes) -> None:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/inference.GRPCInferenceService/ModelInfer"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.conn.send_headers(sid, headers)
        self.pending.append([sid, b"\x00" + struct.pack(">I", len(message)) + message])
        self.send_pending()

    def send_pending(self) -> None:
        """Send request bodies as far as the server's windows allow (it reads them: they are requests)."""
        for entry in list(self.pending):
            sid, data = entry
            while data:
                room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if room <= 0:
                    break
                self.conn.send_data(sid, data[:room])
                data = data[room:]
            entry[1] = data
            if not data:
                self.conn.end_stream(sid)
                self.pending.remove(entry)
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def open_streams(self) -> int:
        return self.conn.open_outbound_streams


@pytest.mark.slow
def test_stalled_reader_is_bounded_cut_off_and_its_memory_returned(served):
    """A client announcing a zero receive window keeps asking for large `y` outputs and never reads:
    what its replies hold stays within its share of the budget, honest calls go on, and its
    connection is closed (connection age + grace) with everything it held returned."""
    base = served.rss()
    x = np.zeros((8, 250, 80), np.float32)  # y: 2 MB per reply; ~22 MiB held per call in all
    message = _request("mid", x, ("y",)).SerializeToString()
    attacker = _H2(served.port, window=0)
    attacker.pump(0.3)
    assert attacker.max_streams == 16  # --max-streams-per-connection, advertised
    honest_codes: dict[str, int] = {}
    peak, held_peak = base, 0.0
    t0 = time.monotonic()
    with _channel(served.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        small = _request("uni", np.ones((1, 3, 5), np.float32))
        while time.monotonic() - t0 < 8 and not attacker.closed:
            while not attacker.goaway and not attacker.pending and attacker.open_streams() < 16:
                attacker.call(served.port, message)
            attacker.pump(0.05)
            if not attacker.closed and not attacker.goaway:
                attacker.send_pending()
            try:
                stub.ModelInfer(small, timeout=10)
                honest_codes["OK"] = honest_codes.get("OK", 0) + 1
            except grpc.RpcError as exc:
                honest_codes[exc.code().name] = honest_codes.get(exc.code().name, 0) + 1
            peak = max(peak, served.rss())
            held_peak = max(held_peak, served.metric("lstm_memory_held_bytes"))
        cut_after = time.monotonic() - t0
        attacker.sock.close()
        time.sleep(0.5)
        held_after = served.metric("lstm_memory_held_bytes")
        stub.ModelInfer(small, timeout=10)
    print(f"stalled reader: RSS {base:.0f} MiB before, peak {peak:.0f}, held peak {held_peak / MIB:.0f} MiB, "
          f"cut after {cut_after:.1f} s, honest {honest_codes}, after {served.rss():.0f}")  # fmt: skip
    assert attacker.goaway and attacker.closed and cut_after < 7  # age 3 s + grace 1 s
    assert 0 < held_peak <= 0.5 * BUDGET_MB * MIB  # its share, no more
    assert held_after == 0
    assert set(honest_codes) == {"OK"} and honest_codes["OK"] >= 10
    assert peak < base + BUDGET_MB  # the budget, plus what grpc holds of the waiting requests


def _raw_http(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    return out


def test_rest_head_limits(served):
    """Request line, each header and the whole head are bounded: 414/431, then the connection is closed."""
    long_url = _raw_http(served.http, b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert long_url.startswith(b"HTTP/1.1 414 ") and b"request line over 8192 bytes" in long_url
    long_header = _raw_http(served.http, b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 9000 + b"\r\n\r\n")
    assert long_header.startswith(b"HTTP/1.1 431 ") and b"header 'X-A' over 8192 bytes" in long_header
    many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"c" * 4000) for i in range(20))
    big_head = _raw_http(served.http, b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert big_head.startswith(b"HTTP/1.1 431 ") and b"request head over 65536 bytes" in big_head
    ok = _raw_http(served.http, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 8000 + b"\r\n"
                   b"Connection: close\r\n\r\n")  # fmt: skip
    assert ok.startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
def test_endless_request_heads_cost_nothing(served):
    """Endless header lines, an endless header value and an endless URL, sent as fast as the socket
    takes them on 3 connections for 2 s: each is cut at the head limit; RSS and health unharmed."""
    base = served.rss()
    prefixes = [b"GET /v2 HTTP/1.1\r\nHost: x\r\n", b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-A: ", b"GET /v2/"]
    fillers = [b"X-Pad: " + b"c" * 8000 + b"\r\n", b"b" * 65536, b"a" * 65536]
    answers: list[bytes] = []

    def attack(prefix: bytes, filler: bytes) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2:  # a new connection each time the server closes one
            with socket.create_connection(("127.0.0.1", served.http), timeout=2) as s:
                try:
                    s.sendall(prefix)
                    while time.monotonic() - t0 < 2:
                        s.sendall(filler)
                    continue  # time is up before this head reached a limit: no answer to expect
                except OSError:
                    pass
                try:
                    answers.append(s.recv(200))
                except OSError as exc:
                    answers.append(repr(exc).encode())

    threads = [threading.Thread(target=attack, args=pair) for pair in zip(prefixes, fillers)]
    for t in threads:
        t.start()
    latencies = []
    while any(t.is_alive() for t in threads) or not latencies:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{served.http}/v2/health/live", timeout=5) as r:
            assert r.status == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    print(f"endless heads: RSS {base:.0f} -> {served.rss():.0f} MiB, health max {max(latencies) * 1e3:.0f} ms; "
          f"{len(answers)} connections cut, first answers {[a[:12] for a in answers[:3]]}")  # fmt: skip
    assert served.rss() < base + 50
    assert max(latencies) < 1.0
    odd = [a for a in answers if not (a.startswith((b"HTTP/1.1 431", b"HTTP/1.1 414")) or b"Reset" in a or not a)]
    assert len(answers) > 3 and not odd, odd[:5]


@pytest.mark.slow
def test_pipelining_client_that_never_reads_is_bounded_and_cut_off(served):
    """10 connections pipeline up to 500 inference requests each and never read: the server parses a
    few per connection, holds one reply each, and closes them after the send timeout."""
    base = served.rss()
    cut_before = served.metric("lstm_connections_cut_total")
    body = json.dumps({"inputs": [{"name": "x", "shape": [64, 50, 5], "datatype": "FP32",
                                   "data": [0.5] * (64 * 250)}]}).encode()  # fmt: skip
    one = b"POST /v2/models/uni/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    socks, accepted = [], 0
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", served.http))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(0.3)
        try:
            for _ in range(500):
                s.sendall(one)
                accepted += 1
        except OSError:
            pass
        socks.append(s)
    held = served.rss()
    time.sleep(3)  # past --send-timeout-s 2
    closed = 0
    for s in socks:
        s.settimeout(0.5)
        try:
            while s.recv(1 << 20):
                pass
            closed += 1
        except ConnectionResetError:
            closed += 1
        except OSError:
            pass
        s.close()
    cut = served.metric("lstm_connections_cut_total") - cut_before
    print(f"pipelining never read: {accepted} requests into the sockets, RSS {base:.0f} -> {held:.0f} MiB while "
          f"held, {closed} connections closed by the server ({cut:.0f} by the send timeout)")  # fmt: skip
    assert held < base + 10 * 5  # at most a few MiB a connection
    assert closed == 10 and cut >= 1


@pytest.mark.slow
def test_pipelining_small_replies_reads_nothing_ahead(served):
    """One connection pipelines requests with ~100 KB bodies and tiny replies, never reading: the
    server parses a few ahead and leaves the rest in the socket (it neither buffers what the client
    sends nor re-copies a growing backlog), and other clients are served meanwhile."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4000, 5], "datatype": "FP32",
                                   "data": [0.25] * 20000}], "outputs": [{"name": "h_n"}]}).encode()  # fmt: skip
    one = b"POST /v2/models/uni/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    base = served.rss()
    s = socket.create_connection(("127.0.0.1", served.http))
    s.settimeout(0.2)
    sent, health = 0, []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            s.sendall(one)
            sent += len(one)
        except OSError:
            pass
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{served.http}/v2/health/live", timeout=10) as resp:
            resp.read()
        health.append(time.perf_counter() - t0)
    peak = served.rss()
    s.close()
    health.sort()
    print(f"pipelining small replies: {sent / 1e6:.1f} MB sent, RSS {base:.0f} -> {peak:.0f} MiB, "
          f"health p50 {1e3 * health[len(health) // 2]:.1f} ms over {len(health)} calls")  # fmt: skip
    assert peak < base + 15, (base, peak)  # before the fix: +30 MiB in these 3 s, growing
    assert health[len(health) // 2] < 0.1


def test_one_client_cannot_take_every_sequence_slot(served):
    """An attacker starting sequences on one connection gets its share (10 of 40); an honest client
    on another connection still starts its own."""

    def start(seq_id: int) -> pb.ModelInferRequest:
        req = _request("suni", np.ones((1, 2, 5), np.float32))
        req.parameters["sequence_id"].uint64_param = seq_id
        req.parameters["sequence_start"].bool_param = True
        return req

    with _channel(served.target) as attacker, _channel(served.target) as honest:
        stub = pb_grpc.GRPCInferenceServiceStub(attacker)
        got, refusal = 0, None
        for i in range(40):
            try:
                stub.ModelInfer(start(1000 + i), timeout=10)
                got += 1
            except grpc.RpcError as exc:
                refusal = exc
                break
        assert got == 10 and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--sequence-client-share 0.25 = 10" in refusal.details()
        other = pb_grpc.GRPCInferenceServiceStub(honest)
        for i in range(5):
            other.ModelInfer(start(2000 + i), timeout=10)
        for who, seq_id in [(stub, 1000 + i) for i in range(10)] + [(other, 2000 + i) for i in range(5)]:
            end = _request("suni", np.ones((1, 1, 5), np.float32))  # end them: the slots are free again
            end.parameters["sequence_id"].uint64_param = seq_id
            end.parameters["sequence_end"].bool_param = True
            who.ModelInfer(end, timeout=10)


def test_client_strings_are_clipped_in_errors(served):
    with _channel(served.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        cases = []
        r = _request("uni", np.ones((1, 3, 5), np.float32), ())
        r.inputs[0].name = "A" * 100_000
        cases.append(r)
        r = _request("uni", np.ones((1, 3, 5), np.float32), ("B" * 100_000,))
        cases.append(r)
        r = _request("uni", np.ones((1, 3, 5), np.float32), [f"unknown_{i:05d}" for i in range(10_000)])
        cases.append(r)
        r = _request("uni", np.ones((1, 3, 5), np.float32), ())
        r.inputs[0].datatype = "D" * 100_000
        cases.append(r)
        r = _request("uni", np.ones((1, 3, 5), np.float32), ())
        encode_input(r, "C" * 50_000, np.ones((1,), np.float32))
        encode_input(r, "C" * 50_000, np.ones((1,), np.float32))
        cases.append(r)
        for r in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(r, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()[:200]
            details = err.value.details()
            # the names are clipped, or the request is refused by its counts before any name is read
            counted = "more than 1024 outputs" in details or "the request has 3 inputs" in details
            clipped = "chars)" in details or "more)" in details or counted
            assert len(details) < 1200 and clipped, details[:200]


def test_oversized_digit_strings_are_a_400_naming_the_header(served):
    body = b'{"inputs":[]}'
    head = b"POST /v2/models/uni/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
    request = head + b"Inference-Header-Content-Length: " + b"9" * 5000 + b"\r\nConnection: close\r\n\r\n" + body
    answer = _raw_http(served.http, request)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Inference-Header-Content-Length has 5000 digits: at most 20 are accepted" in answer


def test_metrics_port_needs_no_thread_per_connection(served):
    """Idle and half-sent connections to the metrics port cost no thread; past the cap they are
    closed at once, and scrapes still answer."""
    threads = _threads(served.proc.pid)
    socks = []
    for i in range(150):
        s = socket.create_connection(("127.0.0.1", served.metrics), timeout=5)
        if i % 2:
            s.sendall(b"GET /metr")
        socks.append(s)
    time.sleep(0.5)
    during = _threads(served.proc.pid)
    for s in socks:
        s.close()
    time.sleep(0.2)
    assert served.metric("lstm_memory_budget_bytes") > 0
    print(f"metrics: {len(socks)} idle connections, server threads {threads} -> {during}")
    assert during <= threads + 2
    assert re.search(r"\d", str(served.metric("process_resident_memory_bytes")))


@pytest.mark.slow
def test_rapid_reset_cancels_no_honest_call(served):
    """One connection opens ModelInfer streams and resets them at once, as fast as it can, for 3 s:
    with --max-streams-per-connection advertised, grpc refuses the streams still being torn down,
    and an honest client's ModelInfer calls all succeed (with no limit ~10 % were CANCELLED)."""
    codes: dict[str, int] = {}
    stop = threading.Event()

    def honest() -> None:
        with _channel(served.target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            small = _request("uni", np.ones((1, 3, 5), np.float32))
            while not stop.is_set():
                try:
                    stub.ModelInfer(small, timeout=10)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                time.sleep(0.01)

    thread = threading.Thread(target=honest)
    thread.start()
    attacker = _H2(served.port)
    attacker.pump(0.2)
    headers = [(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
               (":authority", served.target), ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    resets, t0, ended = 0, time.monotonic(), "still open"
    attacker.sock.setblocking(False)
    while time.monotonic() - t0 < 3:
        try:
            for _ in range(50):
                sid = attacker.conn.get_next_available_stream_id()
                attacker.conn.send_headers(sid, headers)
                attacker.conn.reset_stream(sid, 8)  # CANCEL
                resets += 1
            attacker.sock.sendall(attacker.conn.data_to_send())
            events = attacker.conn.receive_data(attacker.sock.recv(1 << 20))
        except BlockingIOError:
            continue
        except (h2.exceptions.ProtocolError, OSError) as exc:  # GOAWAY (the connection age, 3 s) or closed
            ended = f"{type(exc).__name__} after {time.monotonic() - t0:.1f} s"
            break
        if any(isinstance(ev, h2.events.ConnectionTerminated) for ev in events):
            ended = f"GOAWAY after {time.monotonic() - t0:.1f} s"
            break
    stop.set()
    thread.join()
    attacker.sock.close()
    print(f"rapid reset: {resets} streams reset ({ended}); honest ModelInfer {codes}")
    assert resets > 5000 and codes.get("OK", 0) >= 5
    assert set(codes) == {"OK"}, codes


def test_rest_json_parse_is_held_in_the_budget(served):
    """A large JSON body holds JSON_PARSE_FACTOR x its size while it is parsed: a 20 MB body (200 MB
    of parse, over one client's 150 MiB share) is refused 429 naming the budget before it is parsed."""
    import http.client

    values = 5_000_000  # "0.5," each: 20 MB of JSON
    body = b'{"inputs":[{"name":"x","shape":[1,1000000,5],"datatype":"FP32","data":[' + b"0.5," * (values - 1)
    body += b"0.5]}]}"
    base = served.rss()
    conn = http.client.HTTPConnection("127.0.0.1", served.http, timeout=30)
    t0 = time.monotonic()
    conn.request("POST", "/v2/models/uni/infer", body=body, headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    text = answer.read().decode()
    conn.close()
    assert answer.status == 429, text[:300]
    assert "per-client share of 150 MiB" in text and "--memory-budget-mb 300" in text, text[:300]
    assert time.monotonic() - t0 < 10 and served.rss() < base + 100  # the body, not its parse


# -- outputs sized by input values -----------------------------------------------------------------------
def _fill_models(root: Path) -> Path:
    """`fill`: y = ConstantOfShape(x), an output the request's *values* size; `peak`: y =
    ReduceMax(ConstantOfShape(x)), a temporary they size behind a one-value output. Every value 2.5."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh

    def save(name: str, nodes: list, out) -> None:
        graph = oh.make_graph(nodes, name, [oh.make_tensor_value_info("x", TensorProto.INT64, [1])], [out])
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
        model.ir_version = 8
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))

    value = oh.make_tensor("v", TensorProto.FLOAT, [1], [2.5])
    save("fill", [oh.make_node("ConstantOfShape", ["x"], ["y"], value=value)],
         oh.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]))  # fmt: skip
    save("peak", [oh.make_node("ConstantOfShape", ["x"], ["t"], value=value),
                  oh.make_node("ReduceMax", ["t"], ["y"], keepdims=0)],
         oh.make_tensor_value_info("y", TensorProto.FLOAT, []))  # fmt: skip
    return root


def _ask(port: int, model: str, n: int) -> tuple[int, np.ndarray | str]:
    """A ~90-byte REST request for n float32 values (binary reply): (status, values or error text)."""
    import http.client

    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [n]}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
        split = answer.getheader("Inference-Header-Content-Length")
    finally:
        conn.close()
    if answer.status != 200:
        return answer.status, data.decode("utf-8", "replace")
    return 200, np.frombuffer(data[int(split) :], np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("budget_mb", [512, 0], ids=["budget-512", "defaults"])
def test_outputs_sized_by_values_are_capped_and_returned(tmp_path, budget_mb):
    """Tiny requests whose values ask ONNX Runtime for far more than one call may hold (an output,
    or a temporary, sized by ConstantOfShape) fail cleanly at the cap of the shared arena that
    versions sized by values allocate from, naming the flag that set it; an honest client's calls
    meanwhile all succeed; an in-budget value-sized call answers; and RSS 10 s after is within
    512 MiB of the start (the arena gives back what the runs grew it by)."""
    root = _fill_models(tmp_path / "models")
    http = free_port()
    budget = ["--memory-budget-mb", str(budget_mb)] if budget_mb else []
    replica = start_process(["-m", "server", "--model-repository", str(root), "--port", "0", "--device", "cpu",
                             "--http-port", str(http), "--metrics-port", "-1", *budget])  # fmt: skip
    pid = replica.proc.pid
    cap_mb, flag = (512, "--memory-budget-mb") if budget_mb else (1024, "--max-request-memory-mb")
    huge = 2 * cap_mb << 18  # float32 values: twice the cap
    latencies: list[float] = []
    failures: list[str] = []
    stop, done = threading.Event(), threading.Event()
    base = peak = _rss_mib(pid)

    def honest() -> None:
        while not stop.is_set():
            for model in ("fill", "peak"):
                t = time.monotonic()
                status, values = _ask(http, model, 1000)
                latencies.append(time.monotonic() - t)
                want = 1000 if model == "fill" else 1
                if status != 200 or len(values) != want or not np.all(values == 2.5):
                    failures.append(f"{model}: {status} {str(values)[:200]}")
            time.sleep(0.02)

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mib(pid))
            time.sleep(0.01)

    watcher, prober = threading.Thread(target=watch), threading.Thread(target=honest)
    try:
        for _ in range(3):
            assert _ask(http, "fill", 10)[0] == 200
        time.sleep(1)
        base = peak = _rss_mib(pid)
        watcher.start()
        prober.start()
        refused = []
        for model in ("fill", "peak", "fill"):  # three ~90-byte requests for twice the cap each
            t0 = time.monotonic()
            status, text = _ask(http, model, huge)
            refused.append((model, status, round(time.monotonic() - t0, 2)))
            assert status == 429, (model, status, str(text)[:300])
            assert flag in text and "ONNX Runtime could not allocate" in text, text[:300]
        with _channel(f"127.0.0.1:{replica.port}") as ch:  # gRPC alike
            request = pb.ModelInferRequest(model_name="peak")
            encode_input(request, "x", np.array([huge], np.int64))
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and flag in err.value.details()
        status, values = _ask(http, "fill", 8 << 20)  # 32 MiB of output: within every limit
        assert status == 200 and len(values) == 8 << 20 and np.all(values == 2.5)
        del values
        status, values = _ask(http, "peak", cap_mb << 17)  # a temporary of half the cap
        assert status == 200 and values.tolist() == [2.5]
        time.sleep(0.5)
        stop.set()
        prober.join(60)
        peak_during = peak
        time.sleep(10)
        after = _rss_mib(pid)
    finally:
        stop.set()
        done.set()
        for thread in (prober, watcher):
            if thread.is_alive():
                thread.join(60)
        replica.proc.terminate()
        replica.proc.wait(30)
    p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    print(f"values-sized x3 ({flag} cap {cap_mb} MiB): RSS start {base:.0f} MiB, peak {peak_during:.0f}, "
          f"10 s after {after:.0f}; refused {refused}; honest {len(latencies)} calls, p99 {p99 * 1000:.0f} ms, "
          f"failures {failures[:3]}")  # fmt: skip
    assert not failures and len(latencies) >= 10
    assert peak_during < base + 2048  # one call never takes 2 GiB
    assert after < base + 512


@pytest.mark.slow
def test_stalled_reader_under_default_settings_gives_its_memory_back(mid_model, tmp_path):
    """A client announcing a zero receive window asks a server with default settings for large
    encoder outputs for 15 s and never reads; an honest client's calls meanwhile all succeed, and
    10 s after the stalled client goes the server is back near its start: its cancelled calls'
    garbage is collected and the session's arena, whose regions their outputs kept, is shrunk again."""
    shutil.copytree(mid_model.parents[1], tmp_path / "models" / "mid")
    replica = start_process(["-m", "server", "--model-repository", str(tmp_path / "models"), "--port", "0",
                             "--device", "cpu", "--http-port", str(free_port()), "--metrics-port", "-1",
                             "--intra-op-threads", "1"])  # fmt: skip
    pid, target = replica.proc.pid, f"127.0.0.1:{replica.port}"
    message = _request("mid", np.zeros((16, 800, 80), np.float32), ("y",)).SerializeToString()  # y: 13 MB
    latencies: list[float] = []
    codes: dict[str, int] = {}
    try:
        with _channel(target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            small = _request("mid", np.ones((1, 3, 80), np.float32))
            stub.ModelInfer(small, timeout=30)
            time.sleep(1)
            base = peak = _rss_mib(pid)
            attacker = _H2(replica.port, window=0)
            t0 = sent = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15:
                if sent < (time.monotonic() - t0) / 0.3:  # a call every 0.3 s, none of them read
                    attacker.call(replica.port, message)
                    sent += 1
                attacker.pump(0.05)
                attacker.send_pending()
                t = time.monotonic()
                try:
                    stub.ModelInfer(small, timeout=30)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                latencies.append(time.monotonic() - t)
                peak = max(peak, _rss_mib(pid))
            attacker.sock.close()
            time.sleep(10)
            after = _rss_mib(pid)
            stub.ModelInfer(small, timeout=30)  # the server goes on
    finally:
        replica.proc.terminate()
        replica.proc.wait(30)
    p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))]
    print(f"stalled reader, defaults: {sent} calls of 13 MB never read; RSS {base:.0f} MiB before, peak {peak:.0f}, "
          f"10 s after it left {after:.0f}; honest {codes}, p99 {p99 * 1000:.0f} ms")  # fmt: skip
    assert set(codes) == {"OK"} and codes["OK"] >= 20
    assert peak > base + 300  # the attack did hold memory while it lasted
    assert after < base + 150, (base, after)
