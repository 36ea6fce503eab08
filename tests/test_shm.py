"""server/shm.py against real POSIX shared-memory objects in /dev/shm: the layout tritonclient writes
and reads, and every safety rule (bounds before access, limits, owners, unregister while in use,
objects that shrink or vanish after they were registered: an error, never SIGBUS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.dtypes import serialize_bytes
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from server.shm import (
    SHM_ROOT,
    SharedMemoryRegistry,
    ShmCall,
    ShmRef,
    cuda_shared_memory,
    owner_of,
    parse_params,
)
from server.status import error_status

HERE = Path(__file__).resolve().parent
TRITON_PYTHON = os.environ.get("TRITON_PYTHON") or str(HERE.parent / ".venv-triton" / "bin" / "python")
pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="needs /dev/shm (Linux)")


@pytest.fixture()
def make_object():
    """Creates shared-memory objects as shm_open(O_CREAT) + ftruncate do (what tritonclient's
    create_shared_memory_region makes), removed after the test. Returns the key ('/name')."""
    made: list[Path] = []

    def make(size: int, data: bytes = b"") -> str:
        key = f"/lstm-serve-test-{uuid.uuid4().hex[:12]}"
        path = SHM_ROOT / key[1:]
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            if data:
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        made.append(path)
        return key

    yield make
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture()
def registry():
    reg = SharedMemoryRegistry()
    yield reg
    reg.close()


def object_path(key: str) -> Path:
    return SHM_ROOT / key.lstrip("/")


def open_fds(key: str) -> int:
    """Descriptors of this process open on the object `key`."""
    target = str(object_path(key))
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(target):
                count += 1
        except OSError:
            pass
    return count


# -- the layout tritonclient uses ---------------------------------------------------------------

_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient import utils

in_key, out_key = sys.argv[1:3]
x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
words = np.array([b"hello", b"", "caf\u00e9".encode(), b"\x00\xff"], dtype=object).reshape(2, 2)
packed = utils.serialize_byte_tensor(words)
size_in = x.nbytes + len(packed.item())
h_in = shm.create_shared_memory_region("in", in_key, size_in)
shm.set_shared_memory_region(h_in, [x])
shm.set_shared_memory_region(h_in, [packed], offset=x.nbytes)
h_out = shm.create_shared_memory_region("out", out_key, 4096)
print(json.dumps({"size_in": size_in, "x_bytes": x.nbytes, "packed": len(packed.item())}), flush=True)
sys.stdin.readline()  # the test has written the outputs
y = shm.get_contents_as_numpy(h_out, np.float32, [3, 2])
s = shm.get_contents_as_numpy(h_out, np.object_, [3], offset=24)
print(json.dumps({"y": y.tolist(), "s": [v.hex() for v in s.tolist()]}), flush=True)
shm.destroy_shared_memory_region(h_in)
shm.destroy_shared_memory_region(h_out)
"""


def test_tritonclient_regions_round_trip(registry):
    """tritonclient.utils.shared_memory creates and fills the input object (FP32 then BYTES, Triton's
    4-byte length layout), the registry reads both; the registry writes an FP32 and a BYTES output,
    tritonclient's get_contents_as_numpy reads them back."""
    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    tag = uuid.uuid4().hex[:10]
    in_key, out_key = f"/lstm-serve-tc-in-{tag}", f"/lstm-serve-tc-out-{tag}"
    proc = subprocess.Popen(
        [TRITON_PYTHON, "-c", _CLIENT, in_key, out_key],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        sizes = json.loads(line)
        registry.register("in", in_key, 0, sizes["size_in"])
        registry.register("out", out_key, 0, 4096)
        assert registry.status() == [
            {"name": "in", "key": in_key, "offset": 0, "byte_size": sizes["size_in"]},
            {"name": "out", "key": out_key, "offset": 0, "byte_size": 4096},
        ]
        x = registry.read_input("in", 0, sizes["x_bytes"], "FP32", [2, 3, 4], tensor="x")
        np.testing.assert_array_equal(x, np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7)
        words = registry.read_input("in", sizes["x_bytes"], sizes["packed"], "BYTES", [2, 2], tensor="w")
        assert words.tolist() == [[b"hello", b""], ["café".encode(), b"\x00\xff"]]
        y = np.array([[1.5, -2.0], [3.25, 0.0], [1e-7, 7.0]], np.float32)
        s = np.array([b"a", "é".encode(), b""], dtype=object)
        assert registry.write_outputs([("out", 0, 24, y, "y"), ("out", 24, 100, s, "s")]) == [24, 4 + 1 + 4 + 2 + 4]
        out, err = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = json.loads(out.strip().splitlines()[-1])
    np.testing.assert_array_equal(np.array(got["y"], np.float32), y)
    assert [bytes.fromhex(v) for v in got["s"]] == s.tolist()


# -- register / status / unregister --------------------------------------------------------------


def test_register_status_unregister(registry, make_object):
    key = make_object(256)
    registry.register("r", key, 64, 128)
    assert registry.status("r") == [{"name": "r", "key": key, "offset": 64, "byte_size": 128}]
    with pytest.raises(AlreadyExists, match="shared memory region 'r' already in manager"):
        registry.register("r", key, 0, 16)
    assert error_status(AlreadyExists("x"))[0] == grpc.StatusCode.ALREADY_EXISTS
    registry.register("r2", key, 0, 256)  # the same object under a second name
    assert [r["name"] for r in registry.status()] == ["r", "r2"]
    with pytest.raises(NotFound, match="Unable to find system shared memory region: 'nope'"):
        registry.status("nope")
    registry.unregister("nope")  # a name it does not know: no error, as Triton
    registry.unregister("r")
    assert [r["name"] for r in registry.status()] == ["r2"]
    registry.unregister()  # all
    assert registry.status() == [] and len(registry) == 0
    assert open_fds(key) == 0  # nothing left open


@pytest.mark.parametrize(
    "key", ["", "/", "///", "a/b", "/a/b", "..", "/..", "/../etc/passwd", "x\0y", "k" * 256], ids=repr
)
def test_register_refuses_bad_keys(registry, key):
    with pytest.raises(InvalidArgument, match="invalid shm key"):
        registry.register("r", key, 0, 8)
    assert len(registry) == 0


def test_register_refuses_what_is_not_a_shm_object(registry, make_object, tmp_path):
    with pytest.raises(InvalidArgument, match="Unable to open shared memory region: '/lstm-serve-test-missing'"):
        registry.register("r", "/lstm-serve-test-missing", 0, 8)
    target = make_object(64)
    link = SHM_ROOT / f"lstm-serve-test-link-{uuid.uuid4().hex[:8]}"
    fifo = SHM_ROOT / f"lstm-serve-test-fifo-{uuid.uuid4().hex[:8]}"
    link.symlink_to(object_path(target))
    os.mkfifo(fifo)
    try:
        with pytest.raises(InvalidArgument, match="Unable to open"):  # never through a symlink
            registry.register("r", "/" + link.name, 0, 8)
        with pytest.raises(InvalidArgument, match="not a shared memory object"):  # and never blocks on a FIFO
            registry.register("r", "/" + fifo.name, 0, 8)
    finally:
        link.unlink()
        fifo.unlink()
    assert len(registry) == 0


def test_register_checks_offset_and_size_against_the_object(registry, make_object):
    key = make_object(100)
    with pytest.raises(InvalidArgument, match=r"offset 40 \+ byte_size 61 is past the end of .* \(100 bytes\)"):
        registry.register("r", key, 40, 61)
    with pytest.raises(InvalidArgument, match="byte_size must be > 0"):
        registry.register("r", key, 0, 0)
    for offset, size in ((-1, 8), (0, -8), (True, 8), (0, 2.5)):
        with pytest.raises(InvalidArgument, match="must be an integer >= 0"):
            registry.register("r", key, offset, size)
    registry.register("r", key, 40, 60)  # exactly to the end
    assert len(registry) == 1


def test_region_count_and_total_size_are_bounded(make_object):
    key = make_object(1000)
    reg = SharedMemoryRegistry(max_regions=2, max_bytes=1500)
    try:
        reg.register("a", key, 0, 1000)
        with pytest.raises(ResourceExhausted, match="over the server's limit of 1500"):
            reg.register("b", key, 0, 501)
        reg.register("b", key, 0, 500)
        with pytest.raises(ResourceExhausted, match="2 regions are registered"):
            reg.register("c", key, 0, 1)
        assert [r["name"] for r in reg.status()] == ["a", "b"]
        reg.unregister("a")  # room again
        reg.register("c", key, 0, 1000)
    finally:
        reg.close()
    assert open_fds(key) == 0


def test_disabled_registry_refuses_register(make_object):
    reg = SharedMemoryRegistry(disabled="system shared memory needs --workers 1")
    with pytest.raises(Unimplemented, match="needs --workers 1"):
        reg.register("r", make_object(8), 0, 8)
    assert reg.status() == [] and error_status(Unimplemented("x"))[0] == grpc.StatusCode.UNIMPLEMENTED


# -- owners ---------------------------------------------------------------------------------------


def test_a_region_belongs_to_its_token(registry, make_object):
    alice, bob = owner_of("Bearer alice-token", True), owner_of("bearer bob-token", True)
    assert alice != bob and alice.startswith("token:") and "alice" not in alice
    assert owner_of("Bearer alice-token", False) is None and owner_of(None, True) is None
    key_a, key_b = make_object(64, np.arange(16, dtype=np.int32).tobytes()), make_object(64)
    registry.register("r", key_a, 0, 64, alice)
    for call in (
        lambda: registry.status("r", bob),
        lambda: registry.read_input("r", 0, 64, "INT32", [16], bob),
        lambda: registry.write_output("r", 0, 64, np.zeros(16, np.int32), bob),
        lambda: registry.check("r", 0, 64, bob),
        lambda: registry.status("r"),  # no token: another namespace too
    ):
        with pytest.raises(NotFound, match="'r'"):
            call()
    with pytest.raises(InvalidArgument, match="registered by another client"):  # not even under its own name
        registry.register("mine", key_a, 0, 64, bob)
    registry.register("r", key_b, 0, 64, bob)  # names are per owner
    assert registry.status(None, bob) == [{"name": "r", "key": key_b, "offset": 0, "byte_size": 64}]
    registry.unregister(None, bob)  # bob's "all" is bob's only
    assert registry.status(None, alice)[0]["key"] == key_a
    np.testing.assert_array_equal(registry.read_input("r", 0, 64, "INT32", [16], alice), np.arange(16))


# -- reading inputs -------------------------------------------------------------------------------


def test_bounds_are_checked_before_any_access(registry, make_object):
    """Out-of-region requests are refused by the registered size alone: with the object truncated
    to nothing, the answer is still the bounds error, not the object's."""
    key = make_object(256)
    registry.register("r", key, 128, 64)  # the region: bytes 128..192 of the object
    os.truncate(object_path(key), 0)
    cases = [
        (65, 0, "Invalid offset for shared memory region: 'r'"),
        (64, 4, "Invalid offset for"),
        (8, 60, r"Invalid offset \+ byte size for shared memory region: 'r'"),
        (0, 68, "Invalid offset"),
    ]
    for offset, size, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            registry.read_input("r", offset, size, "UINT8", [size])
        with pytest.raises(InvalidArgument, match=message):
            registry.write_output("r", offset, size, np.zeros(size, np.uint8))
        with pytest.raises(InvalidArgument, match=message):
            registry.check("r", offset, size)
    registry.check("r", 0, 64)  # in bounds: check() does not touch the object


def test_read_input_checks_size_against_datatype_and_shape(registry, make_object):
    data = np.arange(8, dtype=np.int64).tobytes() + bytes([0, 1, 2])
    key = make_object(128, data)
    registry.register("r", key, 0, 128)
    with pytest.raises(InvalidArgument, match=r"input 'x': shared memory byte size 32 does not match INT64 \[8\]"):
        registry.read_input("r", 0, 32, "INT64", [8], tensor="x")
    with pytest.raises(InvalidArgument, match="unknown datatype 'FP8'"):
        registry.read_input("r", 0, 8, "FP8", [8], tensor="x")
    with pytest.raises(InvalidArgument, match="negative dimension"):
        registry.read_input("r", 0, 8, "INT64", [-1], tensor="x")
    with pytest.raises(InvalidArgument, match="bytes other than 0 and 1"):
        registry.read_input("r", 64, 3, "BOOL", [3], tensor="b")
    assert registry.read_input("r", 64, 2, "BOOL", [2]).tolist() == [False, True]
    got = registry.read_input("r", 8, 48, "INT64", [2, 3])
    np.testing.assert_array_equal(got, np.arange(1, 7).reshape(2, 3))
    assert registry.read_input("r", 0, 0, "FP32", [0, 4]).shape == (0, 4)


def test_read_input_bytes_layout_is_checked(registry, make_object):
    good = serialize_bytes(np.array([b"ab", b"c"], dtype=object))
    bad = (5).to_bytes(4, "little") + b"ab"  # says 5 bytes, holds 2
    key = make_object(64, good + bad)
    registry.register("r", key, 0, 64)
    assert registry.read_input("r", 0, len(good), "BYTES", [2], tensor="s").tolist() == [b"ab", b"c"]
    with pytest.raises(InvalidArgument, match="input 's'.*after the last of 1 BYTES elements"):
        registry.read_input("r", 0, len(good), "BYTES", [1], tensor="s")
    with pytest.raises(InvalidArgument, match="element 0 is 5 bytes, past the end"):
        registry.read_input("r", len(good), len(bad), "BYTES", [1], tensor="s")
    with pytest.raises(InvalidArgument, match="cannot hold 3 BYTES elements"):  # refused before allocating
        registry.read_input("r", 0, 8, "BYTES", [3], tensor="s")
    with pytest.raises(ResourceExhausted, match="BYTES elements, more than the limit"):
        registry.read_input("r", 0, 64, "BYTES", [1 << 21], tensor="s")


def test_read_input_is_a_copy_taken_once(registry, make_object):
    x = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    key = make_object(128, x.tobytes())
    registry.register("r", key, 0, 128)
    got = registry.read_input("r", 0, 128, "FP32", [32])
    os.truncate(object_path(key), 0)  # the client rewrites, shrinks, unregisters, removes...
    os.truncate(object_path(key), 128)
    registry.unregister("r")
    object_path(key).unlink()
    np.testing.assert_array_equal(got, x)  # ...the input the run got is unchanged
    got[0] = 1.0  # and is the run's own, writable
    assert got.flags.writeable and got.base is not None and got.base.flags.owndata


# -- objects that shrink or vanish ----------------------------------------------------------------


def test_shrunk_object_gives_an_error_not_sigbus(registry, make_object):
    """An object truncated after register: reads and writes answer FAILED_PRECONDITION (a server
    that had mapped the object would die of SIGBUS here, and this test process with it)."""
    key = make_object(1 << 16, b"\x01" * (1 << 16))
    registry.register("r", key, 0, 1 << 16)
    os.truncate(object_path(key), 4096)
    with pytest.raises(FailedPrecondition, match=r"now holds 4096 bytes, fewer than the 65536 .* it shrank"):
        registry.read_input("r", 0, 1 << 16, "UINT8", [1 << 16])
    with pytest.raises(FailedPrecondition, match="shrank"):
        registry.write_output("r", 8192, 64, np.zeros(64, np.uint8))
    assert os.stat(object_path(key)).st_size == 4096  # a refused write did not grow it back
    assert registry.read_input("r", 0, 4096, "UINT8", [4096]).sum() == 4096  # what is still there reads
    registry.write_output("r", 0, 16, np.full(16, 7, np.uint8))
    os.truncate(object_path(key), 0)
    with pytest.raises(FailedPrecondition, match="shrank"):
        registry.read_input("r", 0, 16, "UINT8", [16])
    assert registry.status("r")[0]["byte_size"] == 1 << 16  # still registered; unregister works
    registry.unregister("r")
    assert open_fds(key) == 0


def test_removed_object_gives_an_error(registry, make_object):
    key = make_object(64)
    registry.register("r", key, 0, 64)
    object_path(key).unlink()  # e.g. destroyed and created anew under the same key
    with pytest.raises(FailedPrecondition, match="was removed after the region was registered"):
        registry.read_input("r", 0, 64, "UINT8", [64])
    with pytest.raises(FailedPrecondition, match="was removed"):
        registry.write_output("r", 0, 64, np.zeros(64, np.uint8))
    code, _, message = error_status(FailedPrecondition("x"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_truncation_race_never_kills_the_process(make_object):
    """A child process hammers reads and writes while the object is truncated and regrown under
    it: the child must exit normally (a mapping would SIGBUS at the first read past the end)."""
    key = make_object(1 << 20)
    code = f"""
import numpy as np, os
from server.shm import SharedMemoryRegistry
from server.errors import FailedPrecondition
reg = SharedMemoryRegistry()
reg.register("r", {key!r}, 0, 1 << 20)
print("registered", flush=True)
errors = 0
for i in range(400):
    try:
        reg.read_input("r", 0, 1 << 20, "UINT8", [1 << 20])
        reg.write_output("r", 0, 1 << 19, np.zeros(1 << 19, np.uint8))
    except FailedPrecondition:
        errors += 1
print(errors)
"""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    path = object_path(key)
    assert proc.stdout.readline().strip() == b"registered", proc.communicate(timeout=60)[1].decode()[-2000:]
    while proc.poll() is None:
        os.truncate(path, 0)
        os.truncate(path, 1 << 20)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, err.decode()[-2000:])  # -7 would be SIGBUS
    assert int(out) >= 0  # how many accesses found the object shrunk: timing decides


# -- unregister while in use -----------------------------------------------------------------------


def test_unregister_during_a_read_is_safe(registry, make_object, monkeypatch):
    """The read holds the object open: unregister removes the name at once (NOT_FOUND, the name
    free to register again) and the descriptor is closed when the read is done."""
    x = np.arange(1024, dtype=np.float32)
    key = make_object(x.nbytes, x.tobytes())
    registry.register("r", key, 0, x.nbytes)
    started, go = threading.Event(), threading.Event()
    real_preadv = os.preadv

    def paused_preadv(fd, buffers, offset):  # holds the real read open until the test says go
        started.set()
        assert go.wait(30)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", paused_preadv)
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(x=registry.read_input("r", 0, x.nbytes, "FP32", [1024])))
    reader.start()
    try:
        assert started.wait(30)
        registry.unregister("r")
        with pytest.raises(NotFound):
            registry.status("r")
        with pytest.raises(NotFound):
            registry.check("r", 0, 4)
        assert open_fds(key) == 1  # still open for the read in progress
        other = make_object(16)
        registry.register("r", other, 0, 16)  # the name is free again
    finally:
        go.set()
        reader.join(30)
    np.testing.assert_array_equal(result["x"], x)
    assert open_fds(key) == 0  # closed by the read's end
    assert registry.status("r")[0]["key"] == other


def test_concurrent_use_and_unregister(make_object):
    """Readers and writers on several threads while the region is unregistered and registered
    again and again: each call succeeds or says NOT_FOUND; nothing leaks, nothing crashes."""
    key = make_object(4096, np.arange(1024, dtype=np.int32).tobytes())
    reg = SharedMemoryRegistry()
    failures: list[BaseException] = []
    stop = threading.Event()

    def use() -> None:
        while not stop.is_set():
            try:
                got = reg.read_input("r", 0, 2048, "INT32", [512])
                assert (got == np.arange(512)).all()
                reg.write_output("r", 2048, 2048, np.arange(512, 1024, dtype=np.int32))
            except NotFound:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)
                return

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            try:
                reg.register("r", key, 0, 4096)
            except AlreadyExists:
                pass
            reg.unregister("r")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        reg.close()
    assert not failures, failures[0]
    assert open_fds(key) == 0


# -- writing outputs --------------------------------------------------------------------------------


def test_write_outputs_checks_everything_before_writing(registry, make_object):
    key = make_object(64)
    registry.register("r", key, 0, 64)
    y = np.arange(8, dtype=np.float32)
    with pytest.raises(
        InvalidArgument,
        match=r"output 'y' \(16 bytes\) should be at least 32 bytes to hold the results",
    ):
        registry.write_output("r", 0, 16, y, tensor="y")
    with pytest.raises(InvalidArgument, match="Invalid offset"):  # the second does not fit: the first not written
        registry.write_outputs([("r", 0, 32, y, "y"), ("r", 48, 32, y, "z")])
    with pytest.raises(NotFound):
        registry.write_outputs([("r", 0, 32, y, "y"), ("nope", 0, 32, y, "z")])
    assert object_path(key).read_bytes() == bytes(64)
    s = np.array([["ab", "c"]])  # a str array goes as BYTES, Triton's layout
    assert registry.write_outputs([("r", 0, 32, y[::2], "y"), ("r", 32, 32, s, "s")]) == [16, 11]
    data = object_path(key).read_bytes()
    np.testing.assert_array_equal(np.frombuffer(data[:16], np.float32), y[::2])
    assert data[32:43] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


# -- the frontends' helpers -------------------------------------------------------------------------


def test_parse_params():
    assert parse_params("x", {}) is None
    assert parse_params("x", {"binary_data": True}) is None
    ref = parse_params("x", {"shared_memory_region": "r", "shared_memory_byte_size": 64})
    assert ref == ShmRef("r", 0, 64)
    full = {"shared_memory_region": "r", "shared_memory_offset": 8, "shared_memory_byte_size": 4}
    assert parse_params("x", full) == ShmRef("r", 8, 4)
    cases = [
        ({"shared_memory_region": 3, "shared_memory_byte_size": 4}, "'shared_memory_region' .* expected string"),
        ({"shared_memory_offset": 0}, "'shared_memory_offset' can not be specified without"),
        ({"shared_memory_byte_size": 4}, "'shared_memory_byte_size' can not be specified without"),
        ({"shared_memory_region": "r"}, "'shared_memory_byte_size' must be specified along with"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": "4"}, "expected int64_param"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": True}, "expected int64_param"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 4, "shared_memory_offset": -1}, "expected >= 0"),
    ]
    for params, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            parse_params("x", params)


def test_shm_call_reads_checks_and_writes(registry, make_object):
    """One call as a frontend drives it: an input from shared memory and one inline, an output to
    shared memory checked before the run and written after it, one output in the message."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    key_in, key_out = make_object(64, x.tobytes()), make_object(64)
    registry.register("in", key_in, 0, 64)
    registry.register("out", key_out, 0, 64)
    call = ShmCall(registry)
    region = {"shared_memory_region": "in", "shared_memory_byte_size": 24}
    np.testing.assert_array_equal(call.read_input("x", "FP32", [2, 3], region), x)
    assert call.read_input("lengths", "INT64", [2], {}) is None  # in the message
    with pytest.raises(InvalidArgument, match="'shared_memory_byte_size' must be specified .* for input 'h0'"):
        call.read_input("h0", "FP32", [1], {"shared_memory_region": "in"})
    with pytest.raises(NotFound, match="Unable to find shared memory region: 'nope'"):  # refused before the run
        call.add_output("y", {"shared_memory_region": "nope", "shared_memory_byte_size": 8})
    out = {"shared_memory_region": "out", "shared_memory_byte_size": 32}
    with pytest.raises(InvalidArgument, match="Invalid offset"):
        call.add_output("y", {**out, "shared_memory_offset": 60})
    assert call.add_output("y", {**out, "shared_memory_offset": 8})
    assert not call.add_output("h_n", {"binary_data": True})
    assert list(call.outputs) == ["y"]
    y = np.full((2, 4), 2.5, np.float32)
    call.write({"y": y, "h_n": np.zeros(3, np.float32)})
    data = object_path(key_out).read_bytes()
    assert data[:8] == bytes(8) and data[40:] == bytes(24)
    np.testing.assert_array_equal(np.frombuffer(data[8:40], np.float32).reshape(2, 4), y)
    other = ShmCall(registry, owner_of("Bearer t", True))  # another owner does not see the regions
    with pytest.raises(NotFound):
        other.read_input("x", "FP32", [2, 3], region)


def test_cuda_shared_memory_is_refused_by_name():
    with pytest.raises(Unimplemented, match="CUDA shared memory is not supported by this server"):
        cuda_shared_memory("register", "gpu_region")
    assert cuda_shared_memory("status") == []  # no CUDA regions
    assert cuda_shared_memory("unregister") == [] and cuda_shared_memory("unregister", "x") == []
    with pytest.raises(NotFound, match="Unable to find cuda shared memory region: 'x'"):
        cuda_shared_memory("status", "x")


# -- both frontends, end to end with tritonclient ------------------------------------------------

_E2E = r"""
import json, sys, uuid
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient import utils

protocol, url = sys.argv[1:3]
mod = grpcclient if protocol == "grpc" else httpclient
client = mod.InferenceServerClient(url=url)
client.unregister_system_shared_memory()  # what Triton's examples do first
client.unregister_cuda_shared_memory()
tag = uuid.uuid4().hex[:10]
report = {}


def regions(n_in, n_out):
    h_in = shm.create_shared_memory_region("in", f"/lstm-serve-e2e-in-{tag}", n_in)
    h_out = shm.create_shared_memory_region("out", f"/lstm-serve-e2e-out-{tag}", n_out)
    client.register_system_shared_memory("in", f"/lstm-serve-e2e-in-{tag}", n_in)
    client.register_system_shared_memory("out", f"/lstm-serve-e2e-out-{tag}", n_out)
    return h_in, h_out


def done(*handles):
    client.unregister_system_shared_memory()
    for h in handles:
        shm.destroy_shared_memory_region(h)


# INT32: inputs and outputs in shared memory, at offsets
a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.full((1, 16), 3, np.int32)
h_in, h_out = regions(128, 128)
shm.set_shared_memory_region(h_in, [a, b])
inputs = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
inputs[0].set_shared_memory("in", 64)
inputs[1].set_shared_memory("in", 64, offset=64)
outputs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
outputs[0].set_shared_memory("out", 64)
outputs[1].set_shared_memory("out", 64, offset=64)
result = client.infer("simple", inputs, outputs=outputs)
o0, o1 = result.get_output("OUTPUT0"), result.get_output("OUTPUT1")
dt = o0.datatype if protocol == "grpc" else o0["datatype"]
shape = list(o0.shape) if protocol == "grpc" else o0["shape"]
report["sum"] = shm.get_contents_as_numpy(h_out, utils.triton_to_np_dtype(dt), shape).tolist()
report["diff"] = shm.get_contents_as_numpy(h_out, np.int32, [1, 16], offset=64).tolist()
reply = result.get_response()  # what carried output bytes: nothing
if protocol == "grpc":
    report["payload"] = sum(len(raw) for raw in reply.raw_output_contents)
else:
    report["payload"] = sum(("data" in o) + ("binary_data_size" in o.get("parameters", {})) for o in reply["outputs"])
status = client.get_system_shared_memory_status()
report["status"] = sorted(status.regions) if protocol == "grpc" else sorted(r["name"] for r in status)
# errors: a region the server does not know, a byte size that does not fit, CUDA refused by name
for key, fn in {
    "unknown": lambda: inputs[0].set_shared_memory("nope", 64),
    "mismatch": lambda: inputs[0].set_shared_memory("in", 32),
}.items():
    fn()
    try:
        client.infer("simple", inputs, outputs=outputs)
        report[key] = "no error"
    except Exception as exc:
        report[key] = str(exc)
    inputs[0].set_shared_memory("in", 64)
try:
    client.register_cuda_shared_memory("gpu", b"\0" * 64 if protocol == "grpc" else "AAAA", 0, 64)
    report["cuda"] = "no error"
except Exception as exc:
    report["cuda"] = str(exc)
done(h_in, h_out)

# BYTES, Triton's layout
words = np.array([str(i).encode() for i in range(16)], dtype=object).reshape(1, 16)
ones = np.array([b"1"] * 16, dtype=object).reshape(1, 16)
w, o = utils.serialize_byte_tensor(words), utils.serialize_byte_tensor(ones)
nw, no = utils.serialized_byte_size(w), utils.serialized_byte_size(o)
h_in, h_out = regions(nw + no, 512)
shm.set_shared_memory_region(h_in, [w])
shm.set_shared_memory_region(h_in, [o], offset=nw)
inputs = [mod.InferInput("INPUT0", [1, 16], "BYTES"), mod.InferInput("INPUT1", [1, 16], "BYTES")]
inputs[0].set_shared_memory("in", nw)
inputs[1].set_shared_memory("in", no, offset=nw)
outputs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
outputs[0].set_shared_memory("out", 256)
outputs[1].set_shared_memory("out", 256, offset=256)
result = client.infer("simple_string", inputs, outputs=outputs)
report["str_sum"] = [v.decode() for v in shm.get_contents_as_numpy(h_out, np.object_, [16]).tolist()]
report["str_diff"] = [v.decode() for v in shm.get_contents_as_numpy(h_out, np.object_, [16], offset=256).tolist()]
done(h_in, h_out)
print(json.dumps(report))
"""


def _simple_models(root: Path) -> None:
    """Triton's example models `simple` (INT32 sum and difference) and `simple_string` (the same on
    numbers written as strings), as ONNX graphs."""
    import onnx
    from onnx import TensorProto, helper

    def save(name: str, nodes, dtype) -> None:
        io = [
            helper.make_tensor_value_info(n, dtype, ["batch", 16]) for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")
        ]
        graph = helper.make_graph(nodes, name, io[:2], io[2:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, root / name / "1" / "model.onnx")

    def convert(src: str, dst: str, to: int | None):
        if to is None:
            return helper.make_node("Identity", [src], [dst])
        return helper.make_node("Cast", [src], [dst], to=to)

    math_nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Sub", ["a", "b"], ["d"])]
    for name, dtype, to_int, to_out in (
        ("simple", TensorProto.INT32, None, None),
        ("simple_string", TensorProto.STRING, TensorProto.INT32, TensorProto.STRING),
    ):
        ins = [convert("INPUT0", "a", to_int), convert("INPUT1", "b", to_int)]
        outs = [convert("s", "OUTPUT0", to_out), convert("d", "OUTPUT1", to_out)]
        save(name, ins + math_nodes + outs, dtype)


@pytest.fixture(scope="module")
def simple_server(tmp_path_factory):
    from server.app import InferenceServer
    from server.config import Settings

    root = tmp_path_factory.mktemp("simple_models")
    _simple_models(root)
    srv = InferenceServer(Settings(port=0, http_port=0, model_repository=root, device="cpu", log_level="ERROR",
                                   metrics_port=-1))  # fmt: skip
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_shared_memory_end_to_end(simple_server, protocol):
    """tritonclient's shared-memory calls, as Triton's simple_*_shm clients make them, on both
    frontends: INT32 and BYTES inputs and outputs in regions, status, the errors, CUDA refused."""
    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    port = simple_server.port if protocol == "grpc" else simple_server.http_port
    res = subprocess.run(
        [TRITON_PYTHON, "-c", _E2E, protocol, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["sum"] == [[i + 3 for i in range(16)]] and report["diff"] == [[i - 3 for i in range(16)]]
    assert report["payload"] == 0  # the reply carried no output data
    assert report["status"] == ["in", "out"]
    assert "Unable to find shared memory region: 'nope'" in report["unknown"], report["unknown"]
    assert "INPUT0" in report["mismatch"] and "32" in report["mismatch"], report["mismatch"]
    assert "CUDA shared memory is not supported" in report["cuda"], report["cuda"]
    assert report["str_sum"] == [str(i + 1) for i in range(16)]
    assert report["str_diff"] == [str(i - 1) for i in range(16)]


# -- both frontends, directly: what tritonclient's examples do not cover ----------------------------


def _grpc(srv, token: str | None = None):
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return channel, pb_grpc.GRPCInferenceServiceStub(channel), metadata


def _http(srv, path: str, body=None, method: str | None = None, token: str | None = None):
    """(status, parsed JSON body or raw bytes) of one REST call."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status, raw = res.status, res.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def _shm_tensor(t, region: str, byte_size: int, offset: int = 0) -> None:
    t.parameters["shared_memory_region"].string_param = region
    t.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        t.parameters["shared_memory_offset"].int64_param = offset


def _simple_request(a: np.ndarray, b: np.ndarray):
    """`simple`'s request: INPUT0 from region 'fin', INPUT1 in the message (raw contents hold it
    alone), OUTPUT0 to region 'fout' at offset 64, OUTPUT1 in the reply."""
    from server.proto import grpc_service_pb2 as pb

    r = pb.ModelInferRequest(model_name="simple")
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        t = r.inputs.add(name=name, datatype="INT32", shape=list(arr.shape))
        if name == "INPUT0":
            _shm_tensor(t, "fin", arr.nbytes)
        else:
            r.raw_input_contents.append(arr.tobytes())
    _shm_tensor(r.outputs.add(name="OUTPUT0"), "fout", 64, offset=64)
    r.outputs.add(name="OUTPUT1")
    return r


def test_grpc_mixed_inputs_outputs_stream_and_refusals(simple_server, make_object):
    from server.proto import grpc_service_pb2 as pb

    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.full((1, 16), 5, np.int32)
    key_in, key_out = make_object(64, a.tobytes()), make_object(128)
    channel, stub, _ = _grpc(simple_server)
    with channel:
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="fin", key=key_in, byte_size=64))
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="fout", key=key_out, byte_size=128))
        try:
            reply = stub.ModelInfer(_simple_request(a, b), timeout=30)
            # Triton's reply: every output described, an empty raw entry for the one in shared memory
            assert [o.name for o in reply.outputs] == ["OUTPUT0", "OUTPUT1"]
            assert list(reply.outputs[0].shape) == [1, 16] and reply.outputs[0].datatype == "INT32"
            assert reply.raw_output_contents[0] == b""
            assert np.frombuffer(reply.raw_output_contents[1], np.int32).tolist() == (a - b).ravel().tolist()
            written = np.frombuffer(object_path(key_out).read_bytes()[64:], np.int32)
            assert written.tolist() == (a + b).ravel().tolist()

            # the stream: one shared-memory call per request; a bad one is answered in the stream
            # and the next is served
            object_path(key_out).write_bytes(bytes(128))
            bad = _simple_request(a, b)
            bad.outputs[0].parameters["shared_memory_region"].string_param = "nope"
            requests = [_simple_request(a, b), bad, _simple_request(a, 2 * b)]
            answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
            assert [bool(x.error_message) for x in answers] == [False, True, False]
            assert "Unable to find shared memory region: 'nope'" in answers[1].error_message
            assert answers[2].infer_response.raw_output_contents[0] == b""
            assert np.frombuffer(answers[2].infer_response.raw_output_contents[1], np.int32).tolist() == (
                (a - 2 * b).ravel().tolist()
            )
            written = np.frombuffer(object_path(key_out).read_bytes()[64:], np.int32)
            assert written.tolist() == (a + 2 * b).ravel().tolist()  # the last request's, in order

            # refusals, each before anything is written; the server goes on
            object_path(key_out).write_bytes(bytes(128))
            r = _simple_request(a, b)
            r.outputs[0].parameters["classification"].int64_param = 2
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(r, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "output can't set both 'shared_memory_region' and 'classification'" in err.value.details()
            r = _simple_request(a, b)
            _shm_tensor(r.outputs[0], "fout", 32, offset=64)  # 32 bytes cannot hold 16 INT32
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(r, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "output 'OUTPUT0'" in err.value.details() and "at least 64 bytes" in err.value.details()
            r = _simple_request(a, b)
            r.raw_input_contents.append(b.tobytes())  # one raw entry per input outside shared memory
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(r, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "raw_input_contents has 2 entries for 1 inputs not in shared memory" in err.value.details()
            r = _simple_request(a, b)
            del r.inputs[0].parameters["shared_memory_region"]  # an offset and a size without a region
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(r, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'shared_memory_byte_size' can not be specified without 'shared_memory_region' parameter for " \
                "input 'INPUT0'" in err.value.details()  # fmt: skip
            assert object_path(key_out).read_bytes() == bytes(128)
            with pytest.raises(grpc.RpcError) as err:
                stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="g", byte_size=8))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert stub.ModelInfer(_simple_request(a, b), timeout=30).raw_output_contents[0] == b""
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
        assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


def test_rest_routes_inputs_outputs_and_refusals(simple_server, make_object):
    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.full((1, 16), 5, np.int32)
    key_in, key_out = make_object(64, a.tobytes()), make_object(128)
    base = "/v2/systemsharedmemory"
    assert _http(simple_server, f"{base}/region/fin/register", {"key": key_in, "byte_size": 64}, "POST") == (200, None)
    assert _http(simple_server, f"{base}/region/fout/register", {"key": key_out, "offset": 0, "byte_size": 128},
                 "POST") == (200, None)  # fmt: skip
    try:
        status, rows = _http(simple_server, f"{base}/status")
        assert status == 200 and [r["name"] for r in rows] == ["fin", "fout"]
        assert rows[0] == {"name": "fin", "key": key_in, "offset": 0, "byte_size": 64}
        assert _http(simple_server, f"{base}/region/fout/status")[1] == [rows[1]]
        assert _http(simple_server, f"{base}/region/nope/status")[0] == 404
        status, body = _http(simple_server, f"{base}/region/x/register", {"byte_size": 8}, "POST")
        assert status == 400 and body["error"] == "Shared memory register request has no 'key' field"
        assert _http(simple_server, f"{base}/region/x/register", method="GET")[0] == 405
        assert _http(simple_server, f"{base}/region/x/frobnicate", method="POST")[0] == 404

        def infer(out0: dict | None = None, in0: dict | None = None):
            in0 = {"shared_memory_region": "fin", "shared_memory_byte_size": 64} if in0 is None else in0
            out0 = {"shared_memory_region": "fout", "shared_memory_byte_size": 64, "shared_memory_offset": 64,
                    **(out0 or {})}  # fmt: skip
            body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": in0},
                               {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": b.ravel().tolist()}],
                    "outputs": [{"name": "OUTPUT0", "parameters": out0}, {"name": "OUTPUT1"}]}  # fmt: skip
            return _http(simple_server, "/v2/models/simple/infer", body, "POST")

        status, reply = infer()
        assert status == 200, reply
        assert reply["outputs"][0] == {"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 16]}  # no data
        assert reply["outputs"][1]["data"] == (a - b).ravel().tolist()
        assert np.frombuffer(object_path(key_out).read_bytes()[64:], np.int32).tolist() == (a + b).ravel().tolist()

        object_path(key_out).write_bytes(bytes(128))
        for out0, in0, words in (
            ({"binary_data": True}, None, "Output can't set both 'shared_memory_region' and 'binary_data'"),
            ({"classification": 1}, None, "Output can't set both 'shared_memory_region' and 'classification'"),
            (None, {"shared_memory_region": "fin", "shared_memory_byte_size": 64, "binary_data_size": 64},
             "Input must set only one of 'data', 'binary_data_size', 'shared_memory_region'"),
            (None, {"shared_memory_region": "fin", "shared_memory_byte_size": 60}, "does not match INT32 [1, 16]"),
            (None, {"shared_memory_byte_size": 64}, "can not be specified without 'shared_memory_region'"),
            ({"shared_memory_region": 5}, None, "invalid value type for 'shared_memory_region' parameter for output"),
            ({"shared_memory_offset": 100}, None, "Invalid offset + byte size for shared memory region: 'fout'"),
        ):  # fmt: skip
            status, body = infer(out0, in0)
            assert status == 400 and words in body["error"], body
        assert object_path(key_out).read_bytes() == bytes(128)  # nothing written by a refused call
        assert _http(simple_server, "/v2/cudasharedmemory/status") == (200, [])
        assert _http(simple_server, "/v2/cudasharedmemory/region/g/register", {"raw_handle": {"b64": "AA=="},
                     "device_id": 0, "byte_size": 8}, "POST")[0] == 501  # fmt: skip
        assert "system_shared_memory" in _http(simple_server, "/v2")[1]["extensions"]
    finally:
        assert _http(simple_server, f"{base}/unregister", method="POST") == (200, None)
    assert _http(simple_server, f"{base}/status") == (200, [])


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    from server.app import InferenceServer
    from server.config import Settings

    root = tmp_path_factory.mktemp("simple_models_tokens")
    _simple_models(root)
    srv = InferenceServer(Settings(port=0, http_port=0, model_repository=root, device="cpu", log_level="ERROR",
                                   metrics_port=-1, auth_tokens="tok-a,tok-b"))  # fmt: skip
    srv.start()
    yield srv
    srv.stop(grace=1)


def test_a_region_belongs_to_its_token_on_both_frontends(token_server, make_object):
    """Registered with one token: the other token sees no region, cannot use it (NOT_FOUND) and
    cannot unregister it; the same name is free for it."""
    from server.proto import grpc_service_pb2 as pb

    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.ones((1, 16), np.int32)
    key_in, key_out = make_object(64, a.tobytes()), make_object(128)
    body = {"key": key_in, "byte_size": 64}
    assert _http(token_server, "/v2/systemsharedmemory/region/fin/register", body, "POST", "tok-a")[0] == 200
    channel, stub, meta_a = _grpc(token_server, "tok-a")
    _, _, meta_b = _grpc(token_server, "tok-b")
    with channel:
        try:
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="fout", key=key_out, byte_size=128), metadata=meta_a
            )
            assert sorted(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=meta_a).regions)\
                == ["fin", "fout"]  # fmt: skip
            assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=meta_b).regions
            assert _http(token_server, "/v2/systemsharedmemory/status", token="tok-b") == (200, [])
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_simple_request(a, b), timeout=30, metadata=meta_b)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=meta_b)  # not a's
            reply = stub.ModelInfer(_simple_request(a, b), timeout=30, metadata=meta_a)
            assert reply.raw_output_contents[0] == b""
            assert np.frombuffer(object_path(key_out).read_bytes()[64:], np.int32).tolist() == (a + b).ravel().tolist()
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=meta_a)


def test_settings_switch_it_off_and_workers_do_too():
    from server.app import shm_disabled
    from server.config import Settings, load_settings

    assert shm_disabled(Settings()) is None  # on by default
    assert "--no-system-shared-memory" in shm_disabled(Settings(system_shared_memory=False))
    assert "needs --workers 1" in shm_disabled(Settings(workers=2))
    s = load_settings(["--no-system-shared-memory", "--max-shm-regions", "3", "--max-shm-mb", "5"], environ={})
    assert (s.system_shared_memory, s.max_shm_regions, s.max_shm_mb) == (False, 3, 5)
    with pytest.raises(ValueError, match="max_shm_regions must be >= 1"):
        Settings(max_shm_regions=0)
