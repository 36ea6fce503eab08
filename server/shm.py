"""Triton's system shared-memory extension, transport-free: a registry of client regions, and the
reads and writes of tensors in them. The gRPC and REST frontends translate their wire form to
these calls (register / status / unregister, `parse_params` for a tensor's parameters,
`read_input` before a run, `write_outputs` after it succeeded).

A region is a POSIX shared-memory object (`/dev/shm/<key>`, what `shm_open(key)` and
tritonclient.utils.shared_memory create) plus an offset and a byte size. The server keeps the
object's file descriptor open and moves bytes with pread/pwrite, never through a mapping: a client
that truncates or removes its object can make a mapped read fault (SIGBUS, the whole server gone),
while a read past the end of a file only comes back short. Each access checks the request's offset
and size against the registered size first, then the object's current size (fstat; a call's
outputs in one object share one fstat, taken after every output's bounds were checked and before
the first is written), and a short read is an error too. The cost is the same one copy a mapping
would take (object -> the input's own array; the output's array -> object).

With bearer tokens on, a region belongs to its token: names are per owner, another owner sees
NOT_FOUND, and an object registered by one owner cannot be registered by another. Unregistering a
region that a request is reading or writing is safe: the name is gone at once, the descriptor
is closed when the last user is done.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import stat
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from server.dtypes import DATATYPES, OBJECT, contiguous, deserialize_bytes, oip_of, serialize_bytes
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
    clip,
)

SHM_ROOT = Path("/dev/shm")  # where Linux keeps shm_open's objects
DEFAULT_MAX_REGIONS = 256  # registered regions, all owners together
DEFAULT_MAX_BYTES = 8 << 30  # total byte_size of the registered regions
_NAME_MAX = 255  # longest file name (and so shm key) Linux takes
_IO_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per read/write call
# BYTES elements of one input (the codec's bound for inline BYTES): each becomes a Python object
MAX_BYTES_ELEMENTS = 1 << 20

# The three tensor parameters that place an input or an output in a region (both frontends).
REGION, OFFSET, BYTE_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"
PARAMETERS = (REGION, OFFSET, BYTE_SIZE)
# a call moving more shared-memory bytes than this reads or writes them on an executor thread, not
# the event loop (pread/pwrite of a large region blocks)
INLINE_BYTES = 256 << 10


class ShmRef(NamedTuple):
    """Where a tensor lives: `byte_size` bytes at `offset` into the registered region `region`."""

    region: str
    offset: int
    byte_size: int


def owner_of(authorization: str | None, tokens_on: bool) -> str | None:
    """Who owns the regions a call registers or uses: its bearer token (hashed) when tokens are on,
    else None (one namespace for everyone, as Triton: a client may register on one connection
    and infer on another)."""
    if tokens_on and authorization and authorization[:7].lower() == "bearer ":
        return "token:" + hashlib.sha256(authorization[7:].strip().encode("utf-8", "replace")).hexdigest()[:16]
    return None


def parse_params(tensor: str, params, what: str = "tensor") -> ShmRef | None:
    """The shared-memory parameters of one tensor (`params`: its parameters as plain values, a
    gRPC InferParameter's set field or a JSON value) as a ShmRef; None when it names no region.
    Checks and messages follow Triton's: a string region, integer offset and byte size >= 0,
    offset / byte size only with a region, byte size required with one."""
    region = params.get(REGION)
    if type(region) is str:  # the usual call: plain values of the right types (no bool, no subclass)
        offset, byte_size = params.get(OFFSET, 0), params.get(BYTE_SIZE)
        if type(offset) is int and type(byte_size) is int and offset >= 0 and byte_size >= 0:
            return ShmRef(region, offset, byte_size)
    elif region is None and REGION not in params and OFFSET not in params and BYTE_SIZE not in params:
        return None
    return _checked_params(tensor, params, what)


def _checked_params(tensor: str, params, what: str) -> ShmRef | None:
    """`parse_params` for parameters off its fast path: each rule checked, in Triton's order."""
    region = params.get(REGION)
    has = REGION in params
    if has and not isinstance(region, str):
        raise InvalidArgument(
            f"invalid value type for '{REGION}' parameter for {what} {clip(tensor)}, expected string_param"
        )
    values = {}
    for key in (OFFSET, BYTE_SIZE):
        if key not in params:
            continue
        if not has:
            raise InvalidArgument(
                f"'{key}' can not be specified without '{REGION}' parameter for {what} {clip(tensor)}"
            )
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(
                f"invalid value type for '{key}' parameter for {what} {clip(tensor)}, expected int64_param"
            )
        if value < 0:
            raise InvalidArgument(f"'{key}' parameter for {what} {clip(tensor)} is {value}; expected >= 0")
        values[key] = value
    if not has:
        return None
    if BYTE_SIZE not in values:
        raise InvalidArgument(
            f"'{BYTE_SIZE}' must be specified along with '{REGION}' parameter for {what} {clip(tensor)}"
        )
    return ShmRef(region, values.get(OFFSET, 0), values[BYTE_SIZE])


def cuda_shared_memory(action: str, name: str = "") -> list[dict]:
    """The CUDA shared-memory RPCs and routes (action: status | register | unregister). This server
    registers no CUDA regions: status lists none (NOT_FOUND for a name), unregister has nothing
    to do (Triton's examples call it first thing), register is refused by name (UNIMPLEMENTED)."""
    if action == "register":
        raise Unimplemented(
            f"failed to register CUDA shared memory region {clip(name)}: CUDA shared memory is not supported "
            "by this server; use system shared memory (SystemSharedMemoryRegister, "
            "v2/systemsharedmemory/region/<name>/register)"
        )
    if action == "status" and name:
        raise NotFound(f"Unable to find cuda shared memory region: {clip(name)}")
    return []


def output_bytes(array: np.ndarray, datatype: str | None = None) -> memoryview:
    """An output's bytes as they go into a region (a memoryview of format 'B'): raw little-endian
    elements, or for BYTES each element as a 4-byte little-endian length and its bytes (Triton's
    layout)."""
    if (datatype or oip_of(array.dtype)) == "BYTES" or array.dtype == OBJECT:
        return memoryview(serialize_bytes(array))
    if not array.flags.c_contiguous:
        array = contiguous(array)
    return memoryview(array.reshape(-1)).cast("B")


class _Region:
    """One registration: the open object, where the region lies in it, and how many calls use it."""

    __slots__ = ("name", "key", "offset", "byte_size", "owner", "fd", "ident", "users", "gone")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, owner, fd: int, ident) -> None:
        self.name, self.key, self.offset, self.byte_size, self.owner = name, key, offset, byte_size, owner
        self.fd, self.ident = fd, ident  # ident: (st_dev, st_ino) of the object
        self.users = 0  # calls reading or writing it now
        self.gone = False  # unregistered: close the fd when the last user is done

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def locate(self, offset: int, byte_size: int) -> int:
        """Bounds of a request inside the registered region (Triton's checks and messages), before any
        access; the offset in the object."""
        if offset > self.byte_size or (offset == self.byte_size and byte_size):
            raise InvalidArgument(f"Invalid offset for shared memory region: {clip(self.name)}")
        if offset + byte_size > self.byte_size:
            raise InvalidArgument(
                f"Invalid offset + byte size for shared memory region: {clip(self.name)} (offset {offset} + "
                f"byte size {byte_size} > the region's {self.byte_size} bytes)"
            )
        return self.offset + offset

    def check_object(self, end: int, info: os.stat_result | None = None) -> os.stat_result:
        """The object still exists and still holds `end` bytes: what makes the next access safe.
        `info`: the object's fstat taken for an earlier access of the same call (one per region
        per call); its result, for the next."""
        if info is None:
            try:
                info = os.fstat(self.fd)
            except OSError:
                info = None
        if info is None or info.st_nlink == 0:
            raise FailedPrecondition(
                f"system shared memory region {clip(self.name)}: its object {clip(self.key)} was removed after the "
                "region was registered; unregister it and register the new object"
            )
        if info.st_size < end:
            raise FailedPrecondition(
                f"system shared memory region {clip(self.name)}: its object {clip(self.key)} now holds "
                f"{info.st_size} bytes, fewer than the {end} the access needs; it shrank after the region was "
                "registered"
            )
        return info

    def read_into(self, buffer: memoryview, position: int) -> None:
        total = len(buffer)
        done = os.preadv(self.fd, [buffer], position) if total <= _IO_CHUNK else 0  # the usual: one call
        while done < total:
            got = os.preadv(self.fd, [buffer[done : done + _IO_CHUNK]], position + done)
            if got <= 0:  # the object shrank between fstat and the read
                self.check_object(position + total)
                raise FailedPrecondition(f"system shared memory region {clip(self.name)}: short read")
            done += got

    def write_from(self, view: memoryview, position: int) -> None:
        """`view`: bytes (a memoryview of format 'B', as `output_bytes` gives)."""
        total = len(view)
        done = os.pwritev(self.fd, [view], position) if total <= _IO_CHUNK else 0
        while done < total:
            done += os.pwritev(self.fd, [view[done : done + _IO_CHUNK]], position + done)


class SharedMemoryRegistry:
    """The registered system shared-memory regions of one server process. Thread-safe: the lock
    guards the tables and use counts only; bytes move outside it."""

    def __init__(
        self,
        max_regions: int = DEFAULT_MAX_REGIONS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        disabled: str | None = None,
        root: Path = SHM_ROOT,
    ) -> None:
        """`disabled`: when set, registering is refused (UNIMPLEMENTED) with this message, e.g. with
        --workers > 1, where each process would keep its own registrations."""
        self.max_regions, self.max_bytes, self.disabled, self.root = max_regions, max_bytes, disabled, Path(root)
        self._lock = threading.Lock()
        self._regions: dict[tuple, _Region] = {}  # (owner, name) -> region
        self._bytes = 0

    # -- the three control calls -----------------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int, owner=None) -> None:
        """SystemSharedMemoryRegister: open the object behind `key` and keep it for `name`."""
        if self.disabled:
            raise Unimplemented(self.disabled)
        if not name:
            raise InvalidArgument("'region name' is necessary to register system shared memory region")
        for what, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(
                    f"failed to register shared memory region {clip(name)}: {what} must be an integer >= 0, "
                    f"got {clip(value)}"
                )
        if byte_size == 0:
            raise InvalidArgument(f"failed to register shared memory region {clip(name)}: byte_size must be > 0")
        path = self._path(name, key)
        with self._lock:  # cheap refusals first, before touching the file system
            self._check_room(name, key, byte_size, owner)
        fd = self._open(name, key, path, offset, byte_size)
        info = os.fstat(fd)
        ident = info.st_dev, info.st_ino
        try:
            with self._lock:  # again: another register may have come in meanwhile
                self._check_room(name, key, byte_size, owner)
                if any(r.ident == ident and r.owner != owner for r in self._regions.values()):
                    raise InvalidArgument(
                        f"cannot register shared memory region {clip(name)}: the object behind key {clip(key)} "
                        "is registered by another client"
                    )
                self._regions[(owner, name)] = _Region(name, key, offset, byte_size, owner, fd, ident)
                self._bytes += byte_size
        except BaseException:
            os.close(fd)
            raise

    def status(self, name: str | None = None, owner=None) -> list[dict]:
        """SystemSharedMemoryStatus: [{name, key, offset, byte_size}] of one region (NOT_FOUND if the
        owner has none of that name) or of all the owner's regions."""
        with self._lock:
            if name:
                region = self._regions.get((owner, name))
                if region is None:
                    raise NotFound(f"Unable to find system shared memory region: {clip(name)}")
                return [region.status()]
            return [r.status() for (o, _), r in sorted(self._regions.items(), key=_by_name) if o == owner]

    def unregister(self, name: str | None = None, owner=None) -> None:
        """SystemSharedMemoryUnregister: one region (a name it does not know is no error, as Triton),
        or all the owner's regions. A region in use is closed when its last user is done."""
        with self._lock:
            keys = [(owner, name)] if name else [k for k in self._regions if k[0] == owner]
            for k in keys:
                region = self._regions.pop(k, None)
                if region is not None:
                    self._bytes -= region.byte_size
                    region.gone = True
                    if region.users == 0:
                        os.close(region.fd)

    def close(self) -> None:
        """Unregister every region of every owner (server stop)."""
        for owner in {o for o, _ in list(self._regions)}:
            self.unregister(None, owner)

    def __len__(self) -> int:
        return len(self._regions)

    # -- tensors ---------------------------------------------------------------------------------

    def check(self, name: str, offset: int, byte_size: int, owner=None) -> None:
        """That a request's region exists for this owner and holds offset + byte_size (no access):
        for outputs, before the run, so that a bad output region costs no model run."""
        with self._lock:  # nothing is accessed: no use count to take
            self._find(name, owner).locate(offset, byte_size)

    def read_input(
        self, name: str, offset: int, byte_size: int, datatype: str, shape, owner=None, tensor: str = ""
    ) -> np.ndarray:
        """An input tensor read out of a region into an array of its own (one copy; the region can
        change or go right after). `shape` is checked against the element limits by the caller;
        here its bytes must be exactly `byte_size` (BYTES: length-prefixed elements filling it)."""
        entry = DATATYPES.get(datatype)
        if entry is None:
            raise InvalidArgument(
                f"input {clip(tensor)}: unknown datatype {clip(datatype)}; expected one of {', '.join(DATATYPES)}"
            )
        shape = tuple(map(int, shape))
        if shape and min(shape) < 0:
            raise InvalidArgument(f"input {clip(tensor)}: shape {clip(list(shape))} has a negative dimension")
        count, dtype = math.prod(shape), entry[0]
        strings = dtype.kind == "O"  # BYTES (dtype comparisons cost more than this)
        if strings:
            if count > MAX_BYTES_ELEMENTS:
                raise ResourceExhausted(
                    f"input {clip(tensor)}: {count} BYTES elements, more than the limit of {MAX_BYTES_ELEMENTS} "
                    "per tensor"
                )
            if 4 * count > byte_size:  # each element takes its 4-byte length at least
                raise InvalidArgument(
                    f"input {clip(tensor)}: {byte_size} bytes of shared memory cannot hold {count} BYTES elements "
                    "(each takes a 4-byte length and its bytes)"
                )
        elif count * dtype.itemsize != byte_size:
            raise InvalidArgument(
                f"input {clip(tensor)}: shared memory byte size {byte_size} does not match {datatype} "
                f"{list(shape)}, which takes {count * dtype.itemsize} bytes"
            )
        region = self._acquire(name, owner)
        try:
            position = region.locate(offset, byte_size)
            region.check_object(position + byte_size)
            raw = np.empty(byte_size, np.uint8)
            region.read_into(memoryview(raw), position)
        finally:
            self._release(region)
        if strings:
            try:
                return deserialize_bytes(raw, count, f"input {clip(tensor)}").reshape(shape)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        if dtype.kind == "b" and byte_size and raw.max() > 1:
            raise InvalidArgument(f"input {clip(tensor)}: BOOL content in shared memory holds bytes other than 0 and 1")
        return raw.view(dtype).reshape(shape)

    def write_output(self, name: str, offset: int, byte_size: int, array: np.ndarray, owner=None, tensor: str = ""):
        """One output into its region (`write_outputs` with one item)."""
        return self.write_outputs([(name, offset, byte_size, array, tensor)], owner)

    def write_outputs(self, items, owner=None) -> list[int]:
        """Outputs into their regions, after the run succeeded: `items` are (region, offset,
        byte_size, array, tensor name). Every output is checked (region, bounds, its bytes fit
        byte_size, the object's size) before the first byte is written. The bytes each took."""
        datas = [output_bytes(item[3]) for item in items]
        for (_, _, byte_size, _, tensor), data in zip(items, datas, strict=True):
            if len(data) > byte_size:
                raise InvalidArgument(
                    f"shared memory size specified with the request for output {clip(tensor)} ({byte_size} bytes) "
                    f"should be at least {len(data)} bytes to hold the results"
                )
        regions: list[_Region] = []
        try:
            with self._lock:  # one lock round for all of them (each region's use count taken per item)
                for item in items:
                    region = self._find(item[0], owner)
                    region.users += 1
                    regions.append(region)
            positions = [r.locate(it[1], it[2]) for r, it in zip(regions, items, strict=True)]
            seen: dict[int, os.stat_result] = {}  # one fstat per object for the whole call
            for region, position, data in zip(regions, positions, datas, strict=True):
                seen[id(region)] = region.check_object(position + len(data), seen.get(id(region)))
            for region, position, data in zip(regions, positions, datas, strict=True):
                region.write_from(data, position)
        finally:
            if regions:
                self._release_all(regions)
        return [len(d) for d in datas]

    # -- internals -------------------------------------------------------------------------------

    def _path(self, name: str, key: str) -> Path:
        """The object's path for a key as shm_open reads it: leading slashes dropped, then one plain
        file name (no '/', not '.' or '..', no NUL, at most 255 bytes)."""
        bare = key.lstrip("/") if isinstance(key, str) else ""
        if (
            not bare
            or "/" in bare
            or "\0" in bare
            or bare in (".", "..")
            or len(bare.encode("utf-8", "surrogateescape")) > _NAME_MAX
        ):
            raise InvalidArgument(f"cannot register shared memory region {clip(name)} - invalid shm key {clip(key)}")
        return self.root / bare

    def _check_room(self, name: str, key: str, byte_size: int, owner) -> None:
        if (owner, name) in self._regions:
            raise AlreadyExists(f"shared memory region {clip(name)} already in manager")
        if len(self._regions) >= self.max_regions:
            raise ResourceExhausted(
                f"cannot register shared memory region {clip(name)}: {len(self._regions)} regions are registered, "
                f"the server's limit; unregister some first"
            )
        if self._bytes + byte_size > self.max_bytes:
            raise ResourceExhausted(
                f"cannot register shared memory region {clip(name)}: its {byte_size} bytes would bring the "
                f"registered total to {self._bytes + byte_size}, over the server's limit of {self.max_bytes}"
            )

    def _open(self, name: str, key: str, path: Path, offset: int, byte_size: int) -> int:
        """The object's descriptor, read-write (outputs), never through a symlink, never a FIFO or
        device; it must hold offset + byte_size bytes now."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            raise InvalidArgument(f"Unable to open shared memory region: {clip(key)}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"Unable to open shared memory region: {clip(key)} (not a shared memory object)")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(
                    f"failed to register shared memory region {clip(name)}: offset {offset} + byte_size {byte_size} "
                    f"is past the end of {clip(key)} ({info.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _find(self, name: str, owner) -> _Region:
        """The owner's region of that name (NOT_FOUND otherwise); called holding the lock."""
        region = self._regions.get((owner, name))
        if region is None:
            raise NotFound(f"Unable to find shared memory region: {clip(name)}")
        return region

    def _acquire(self, name: str, owner) -> _Region:
        with self._lock:
            region = self._find(name, owner)
            region.users += 1
            return region

    def _release(self, region: _Region) -> None:
        self._release_all([region])

    def _release_all(self, regions: list[_Region]) -> None:
        with self._lock:
            for region in regions:
                region.users -= 1
                if region.gone and region.users == 0:
                    os.close(region.fd)


class ShmCall:
    """The shared-memory side of one inference call, the same for both frontends: inputs read
    out of their regions while the request is decoded, output regions checked before the run (a
    bad one costs no run), outputs written only after the run succeeded."""

    def __init__(self, registry: SharedMemoryRegistry, owner=None) -> None:
        self.registry, self.owner = registry, owner
        self.outputs: dict[str, ShmRef] = {}  # output name -> where it goes

    def read_input(self, name: str, datatype: str, shape, params) -> np.ndarray | None:
        """The input `name` from shared memory if its parameters name a region, else None (its data
        is in the message)."""
        ref = parse_params(name, params, "input")
        if ref is None:
            return None
        return self.registry.read_input(ref.region, ref.offset, ref.byte_size, datatype, shape, self.owner, name)

    def add_output(self, name: str, params) -> bool:
        """Whether the requested output `name` goes to shared memory (its region checked now)."""
        ref = parse_params(name, params, "output")
        if ref is None:
            return False
        if "classification" in params:  # Triton's words: the classes are computed, never in a region
            raise InvalidArgument("output can't set both 'shared_memory_region' and 'classification'")
        self.registry.check(ref.region, ref.offset, ref.byte_size, self.owner)
        self.outputs[name] = ref
        return True

    def write(self, arrays) -> None:
        """After the run succeeded: the shared-memory outputs among `arrays` (name -> array) into
        their regions, all checked before the first is written."""
        items = [(r.region, r.offset, r.byte_size, arrays[n], n) for n, r in self.outputs.items() if n in arrays]
        if items:
            self.registry.write_outputs(items, self.owner)

    async def write_async(self, arrays, executor) -> None:
        """`write` from the event loop: on `executor` when the outputs are large (pwrite blocks)."""
        if not self.outputs:
            return
        if sum(a.nbytes for n, a in arrays.items() if n in self.outputs) > INLINE_BYTES:
            await asyncio.get_running_loop().run_in_executor(executor, self.write, arrays)
        else:
            self.write(arrays)


def shm_bytes(tensors) -> int:
    """The shared-memory bytes `tensors` (an iterable of parameter mappings) name, by their
    `shared_memory_byte_size`: what decides whether a call moves them off the event loop."""
    total = 0
    for params in tensors:
        if REGION in params and BYTE_SIZE in params:
            value = params[BYTE_SIZE]
            total += value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
    return total


def _by_name(item) -> str:
    return item[0][1]
