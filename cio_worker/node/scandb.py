"""A compiled Hyperscan block database: scanned in C, without the GIL, matches handed to Python.

Two builds of the same engine and API. The system's ``libhs.so.5`` (Debian's ``libvectorscan5``
or ``libhyperscan5``; the images install it) picks AVX2 code at run time; it is called through
ctypes, which releases the GIL for the call. The ``hyperscan`` wheel from PyPI carries SSE code
only and scans the monitor's database about 1.7x slower (benchmarks/README.md, "Log throughput");
it is the fallback where the library is missing.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from typing import Callable, Literal, Protocol, Sequence

log = logging.getLogger(__name__)

CASELESS = 1  # HS_FLAG_CASELESS
MULTILINE = 4  # HS_FLAG_MULTILINE
_MODE_BLOCK = 1  # HS_MODE_BLOCK
_SUCCESS = 0
SYSTEM_LIBRARY = "libhs.so.5"

Engine = Literal["auto", "system", "wheel"]
# Each match: (expression id, offset just past its end).
Hits = list[tuple[int, int]]


class ScanDatabase(Protocol):
    engine: str

    def scan(self, data: bytes | bytearray, end: int) -> Hits: ...


class ScanEngineError(RuntimeError):
    """The requested scan engine cannot be used here."""


def compile_database(expressions: Sequence[bytes], flags: Sequence[int], engine: Engine = "auto",
                     library: str = SYSTEM_LIBRARY) -> ScanDatabase:
    """One block-mode database of ``expressions`` (ids are their positions). ``auto`` takes the
    system library where it loads and runs on this CPU, else the wheel."""
    if engine not in ("auto", "system", "wheel"):
        raise ValueError(f"unknown scan engine {engine!r}: use auto, system or wheel")
    if engine != "wheel":
        try:
            return _SystemDatabase(_system_library(library), expressions, flags)
        except ScanEngineError as exc:
            if engine == "system":
                raise
            log.debug("scanning output with the hyperscan wheel: %s", exc)
    return _WheelDatabase(expressions, flags)


_loaded: dict[str, ctypes.CDLL] = {}


def _system_library(name: str) -> ctypes.CDLL:
    lib = _loaded.get(name)
    if lib is not None:
        return lib
    try:
        lib = ctypes.CDLL(name)
        valid_platform, version = lib.hs_valid_platform, lib.hs_version
    except OSError as exc:
        raise ScanEngineError(f"{name} is not installed (Debian: apt-get install libvectorscan5): {exc}") from exc
    except AttributeError as exc:  # another library of that name, or a Hyperscan older than 4.4
        raise ScanEngineError(f"{name} is not a Hyperscan this agent can use: {exc}") from exc
    valid_platform.restype = ctypes.c_int
    if valid_platform() != _SUCCESS:
        raise ScanEngineError(f"{name} does not run on this CPU")
    version.restype = ctypes.c_char_p
    lib.hs_compile_multi.argtypes = [
        ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.POINTER(_CompileError))]
    lib.hs_free_compile_error.argtypes = [ctypes.POINTER(_CompileError)]
    lib.hs_alloc_scratch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.hs_scan.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                            _MatchHandler, ctypes.c_void_p]
    lib.hs_free_database.argtypes = [ctypes.c_void_p]
    lib.hs_free_scratch.argtypes = [ctypes.c_void_p]
    _loaded[name] = lib
    return lib


class _CompileError(ctypes.Structure):
    _fields_ = [("message", ctypes.c_char_p), ("expression", ctypes.c_int)]


_MatchHandler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_ulonglong,
                                 ctypes.c_uint, ctypes.c_void_p)
_MAX_SCAN = (1 << 32) - 1  # hs_scan takes an unsigned int length


class _SystemDatabase:
    """A database and its scratch space from the system library. One thread at a time."""

    def __init__(self, lib: ctypes.CDLL, expressions: Sequence[bytes], flags: Sequence[int]) -> None:
        count = len(expressions)
        db = ctypes.c_void_p()
        error = ctypes.POINTER(_CompileError)()
        status = lib.hs_compile_multi((ctypes.c_char_p * count)(*expressions), (ctypes.c_uint * count)(*flags),
                                      (ctypes.c_uint * count)(*range(count)), count, _MODE_BLOCK, None,
                                      ctypes.byref(db), ctypes.byref(error))
        if status != _SUCCESS:
            message = error.contents.message.decode(errors="replace") if error else f"status {status}"
            if error:
                lib.hs_free_compile_error(error)
            raise ScanEngineError(f"compiling the output scan failed: {message}")
        scratch = ctypes.c_void_p()
        if lib.hs_alloc_scratch(db, ctypes.byref(scratch)) != _SUCCESS:
            lib.hs_free_database(db)
            raise ScanEngineError("allocating the output scan's scratch space failed")
        self.engine = f"system {lib.hs_version().decode(errors='replace').split()[0]}"
        self._lib, self._db, self._scratch = lib, db, scratch
        # The current scan's list; the handler holds it, not self (no cycle: freed when dropped).
        self._into: list[Hits] = [[]]
        into = self._into
        self._handler = _MatchHandler(lambda id_, _from, to, _flags, _context: into[0].append((id_, to)) or 0)
        weakref.finalize(self, _free, lib, db, scratch)

    def scan(self, data: bytes | bytearray, end: int) -> Hits:
        if end > _MAX_SCAN:
            raise ValueError("a block to scan must be under 4 GiB")
        self._into[0] = hits = []
        # bytes go as they are; a bytearray as a ctypes view of it (no copy), alive for the call
        buffer = data if isinstance(data, bytes) else (ctypes.c_char * len(data)).from_buffer(data)
        status = self._lib.hs_scan(self._db, buffer, end, 0, self._scratch, self._handler, None)
        if status != _SUCCESS:
            raise RuntimeError(f"scanning output failed (Hyperscan status {status})")
        return hits


def _free(lib: ctypes.CDLL, db: ctypes.c_void_p, scratch: ctypes.c_void_p) -> None:
    lib.hs_free_scratch(scratch)
    lib.hs_free_database(db)


class _WheelDatabase:
    """The same database through the ``hyperscan`` wheel."""

    def __init__(self, expressions: Sequence[bytes], flags: Sequence[int]) -> None:
        import hyperscan

        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(expressions=list(expressions), ids=list(range(len(expressions))),
                         elements=len(expressions), flags=list(flags))
        self.engine = "wheel"

    def scan(self, data: bytes | bytearray, end: int) -> Hits:
        hits: Hits = []
        on_match: Callable[..., None] = lambda id_, _from, to, _flags, _ctx: hits.append((id_, to))
        with memoryview(data) as view, view[:end] as block:
            self._db.scan(block, match_event_handler=on_match)
        return hits
