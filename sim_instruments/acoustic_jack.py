"""The acoustic plant on a real audio path: a JACK client between PortAudio's playback and capture ports.

No sound card is needed: JACK's ``dummy`` backend runs the audio graph on a timer at real time
(its ``-w`` option does not make it faster), so the real sounddevice/PortAudio driver streams
through the real JACK server, and this client plays the plate or cavity in between::

    driver (sounddevice) ─ PortAudio:out_0..S-1 ──> labpnn-plant:speaker_1..S ─┐ plant.process(block)
                         ─ PortAudio:out_S     ──> labpnn-plant:ref_in        │ (copied as is)
                         <─ PortAudio:in_0..M-1 ── labpnn-plant:mic_1..M   <──┘
                         <─ PortAudio:in_M      ── labpnn-plant:ref_out

S = ``plant.n_speakers``, M = ``plant.n_mics``; the driver's reference is playback channel S + 1
and comes back on capture channel M + 1 (1-based, as sounddevice's channel mappings; PortAudio
numbers its JACK ports with a counter that runs on across streams, so channel k is the k-th live
port of its client: ``out_{k-1}`` for the first stream, ``out_{base+k-1}`` for later ones). Ports
beyond those stay unconnected (silence). One open stream per PortAudio client (the driver keeps
one long-lived stream); another process's PortAudio client (``PortAudio-01``) is wired on its own. The
reference is copied in the same process call as the plant's block, so it has exactly the latency
of the plant's outputs. PortAudio's client closes the loop, so JACK runs the graph
PortAudio -> plant -> PortAudio with one period of delay on the way back: a signal played comes back
exactly one period later, bit-exact on the reference (measured here: 20/20 calls at ``-p 1024``).

Wiring. PortAudio registers its ports when a stream is opened and, when it starts, connects them
to ``system:*``. The emulator watches port registrations and connections (JACK notification
thread) and, in a worker thread (JACK API calls are not allowed inside notifications), connects
PortAudio's ports to its own and removes every PortAudio <-> ``system:*`` connection — whether the
stream was opened before or after the emulator started. Client names ``PortAudio`` and JACK's
renamed duplicates (``PortAudio-01``) both count.

Faults, for tests. `AcousticJackEmulator.stall` blocks the process callback once (JACK then
reports an xrun and PortAudio flags ``input overflow, output underflow``). A killed emulator (run
as a process, ``python -m labpnn.sim_instruments.acoustic_bench``) leaves PortAudio's inputs
unconnected: the driver then captures zeros **with no flag** — only the reference catches that.
An exception inside the callback is logged (and counted in ``errors``), and that block's outputs
are silence (so the reference goes missing and the driver remeasures) — never a silent death.

The server. `JackServer` starts ``jackd -n NAME --no-realtime -d dummy -r RATE -p PERIOD -C CH -P CH``
with ``JACK_NO_AUDIO_RESERVATION=1`` (no D-Bus device reservation), waits until ``jack_lsp``
lists its ports, exports ``JACK_DEFAULT_SERVER=NAME`` (what PortAudio and jack clients read), and on
stop removes the server's files under ``/dev/shm``. A distinct server name per test session keeps
concurrent sessions apart (names of 24 characters or more crash jack2 1.9.21's clients: refused).
Periods below 1024 gave xruns on a 2-core machine.

Real time on a shared machine. The plant's numpy work runs inside the process callback; with
OpenBLAS's default two threads, a loaded 2-core machine made the cavity's 1024-sample block take
80-100 ms now and then (xruns every few seconds). The emulator holds OpenBLAS to one thread while it
runs (`limit_blas_threads`): no xruns in the same conditions.

Imports numpy, the stdlib and (lazily) PyPI ``JACK-Client`` only: this runs next to a real bench too.
"""
from __future__ import annotations

import contextlib
import ctypes.util
import glob
import logging
import os
import queue
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from typing import Any, Protocol

import numpy as np

from .serving import stop_with_parent

__all__ = [
    "AcousticJackEmulator",
    "JackServer",
    "JackUnavailable",
    "Plant",
    "available",
    "limit_blas_threads",
    "portaudio_available",
    "reclaim_dead_server_slots",
    "registered_servers",
    "remove_server_files",
    "server_running",
]

log = logging.getLogger(__name__)

#: Longest server name that works: with 24 characters or more, jackd starts but its clients
#: (jack_lsp, libjack) die in malloc (jack2 1.9.21, measured here).
MAX_SERVER_NAME = 23



class Plant(Protocol):
    """What the emulator needs from the physics (``labpnn.sim_instruments.acoustic.AcousticPlant``)."""

    sample_rate: int
    n_speakers: int
    n_mics: int

    def process(self, drive: np.ndarray) -> np.ndarray:
        """float32[n, n_speakers] -> float32[n, n_mics], causal, state carried between calls."""
        ...


class JackUnavailable(RuntimeError):
    """jackd could not be started, or does not answer."""


def available() -> tuple[bool, str]:
    """``(True, "")`` when jackd, jack_lsp, libjack and the ``jack`` module (PyPI ``JACK-Client``) are
    all here; else ``(False, reason)`` naming what is missing and how to install it."""
    for binary in ("jackd", "jack_lsp"):
        if shutil.which(binary) is None:
            return False, f"`{binary}` not found (Debian: apt-get install --no-install-recommends jackd2)"
    if ctypes.util.find_library("jack") is None:
        return False, "libjack not found (Debian: apt-get install --no-install-recommends jackd2)"
    try:
        import jack  # noqa: F401
    except (ImportError, OSError) as exc:
        return False, f"python module `jack` unusable ({exc}); pip install JACK-Client"
    return True, ""


def portaudio_available() -> tuple[bool, str]:
    """``(True, "")`` when libportaudio and ``sounddevice`` import (enumerating devices is not checked)."""
    if ctypes.util.find_library("portaudio") is None:
        return False, "libportaudio not found (Debian: apt-get install --no-install-recommends libportaudio2)"
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError) as exc:
        return False, f"python module `sounddevice` unusable ({exc}); pip install sounddevice"
    return True, ""


def _lsp(server_name: str, timeout_s: float = 5.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["jack_lsp", "-s", server_name], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, "JACK_NO_START_SERVER": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return None


def server_running(server_name: str) -> bool:
    """A JACK server of that name answers (its ``system`` ports are listed)."""
    got = _lsp(server_name)
    return got is not None and got.returncode == 0 and "system:" in got.stdout


class JackServer:
    """A ``jackd`` on the dummy backend, as a context manager (or `start`/`stop`).

    ``rate`` samples/s, ``period`` frames per process cycle (also the loop latency), ``channels``
    system ports each way (PortAudio's one device "system" offers that many channels). The log goes
    to ``log_path`` (default: a temporary file, removed at stop unless start failed: the error names it)."""

    def __init__(self, name: str = "labpnn", rate: int = 48000, period: int = 1024, channels: int = 8, *,
                 timeout_s: float = 15.0, log_path: str | None = None, export_env: bool = True):
        if not re.fullmatch(rf"[A-Za-z0-9_.-]{{1,{MAX_SERVER_NAME}}}", name):
            raise ValueError(f"server name {name!r}: 1-{MAX_SERVER_NAME} letters, digits, '_', '.', '-' "
                             f"(jack2 1.9.21 clients crash on longer names)")
        self.name, self.rate, self.period, self.channels = name, int(rate), int(period), int(channels)
        self.timeout_s = timeout_s
        self.log_path = log_path
        self.export_env = export_env
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._own_log = False  # a temporary log we made: removed at a clean stop, kept if start failed
        self._keep_log = False
        self._previous_env: str | None = None

    @property
    def command(self) -> list[str]:
        return ["jackd", "-n", self.name, "--no-realtime", "-d", "dummy", "-r", str(self.rate),
                "-p", str(self.period), "-C", str(self.channels), "-P", str(self.channels)]

    @property
    def env(self) -> dict[str, str]:
        """What a client of this server needs in its environment."""
        return {"JACK_DEFAULT_SERVER": self.name}

    def start(self) -> JackServer:
        if self.process is not None:
            return self
        ok, reason = available()
        if not ok:
            raise JackUnavailable(reason)
        if server_running(self.name):
            raise JackUnavailable(f"a JACK server named {self.name!r} is already running (stop it or pick another name)")
        reclaim_dead_server_slots()  # killed servers' slots: 8 per machine, else "Too many servers"
        if self.log_path is None or self._own_log:
            self._own_log = True
            fd, self.log_path = tempfile.mkstemp(prefix=f"jackd-{self.name}-", suffix=".log")
            os.close(fd)
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1", "JACK_NO_START_SERVER": "1"}
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=env, preexec_fn=stop_with_parent)
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.process.poll() is not None:
                code, pid = self.process.returncode, self.process.pid
                self.process = None
                self._keep_log = True
                self._cleanup(pid)
                raise JackUnavailable(f"jackd exited with status {code} at start; see its log {self.log_path}:\n"
                                      f"{self._log_tail()}")
            if server_running(self.name):
                break
            if time.monotonic() > deadline:
                self._keep_log = True
                self.stop()
                raise JackUnavailable(f"jackd did not answer jack_lsp within {self.timeout_s:.0f} s; "
                                      f"see its log {self.log_path}:\n{self._log_tail()}")
            time.sleep(0.1)
        if self.export_env:
            self._previous_env = os.environ.get("JACK_DEFAULT_SERVER")
            os.environ.update(self.env)
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        pid = None
        if proc is not None:
            pid = proc.pid
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if self.export_env and os.environ.get("JACK_DEFAULT_SERVER") == self.name:
                if self._previous_env is None:
                    os.environ.pop("JACK_DEFAULT_SERVER", None)
                else:
                    os.environ["JACK_DEFAULT_SERVER"] = self._previous_env
        self._cleanup(pid)

    def _cleanup(self, pid: int | None = None) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
            if self._own_log and not self._keep_log:
                with contextlib.suppress(OSError):
                    os.unlink(self.log_path)
        remove_server_files(self.name, pid)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> JackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_BLAS_PREFIXES = ("openblas_", "scipy_openblas_")
_BLAS_SUFFIXES = ("", "64_")


def _openblas_handles() -> list[tuple[Any, Any]]:
    """(get_num_threads, set_num_threads) of every OpenBLAS loaded in this process (numpy's and
    scipy's wheels each bring one, with prefixed symbol names). Linux only: others give []."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    handles = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in _BLAS_PREFIXES:
            for suffix in _BLAS_SUFFIXES:
                get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    put.argtypes = [ctypes.c_int]
                    handles.append((get, put))
    return handles


def limit_blas_threads(threads: int | None) -> list[int]:
    """Set every loaded OpenBLAS to ``threads`` (None: leave them); returns the previous counts, in the
    order `restore_blas_threads` takes. Why: with two BLAS threads, a real-time callback on a loaded
    2-core machine waits for the second thread to be scheduled -- measured here, the cavity's 1024-sample
    block took 1.5 ms median but 80-100 ms at the 99th percentile (xruns every few seconds) with 2
    threads, and at most ~15 ms with 1."""
    if threads is None:
        return []
    previous = []
    for get, put in _openblas_handles():
        previous.append(int(get()))
        put(int(threads))
    return previous


def restore_blas_threads(previous: list[int]) -> None:
    for (_, put), count in zip(_openblas_handles(), previous):
        put(count)


def _registry_segments(allocator_pid: int, shm: str = "/dev/shm") -> list[str]:
    """Names of the shared-memory segments JACK's registry lists as allocated by ``allocator_pid``.

    Layout (jack2 ``shm.h``): a header (magic ``JACK`` u32, protocol u16, type, size, hdr_len,
    entry_len as i32 from offset 8), then entries of ``entry_len`` bytes at ``hdr_len``: index i16,
    allocator pid i32 at +4, size i32 at +8, the segment's name (``/jack-UID-N``) at +12."""
    try:
        with open(os.path.join(shm, "jack-shm-registry"), "rb") as f:
            raw = f.read()
        magic, = struct.unpack_from("<I", raw, 0)
        _, size, hdr_len, entry_len = struct.unpack_from("<iiii", raw, 8)
        if magic != 0x4A41434B or entry_len < 16 or hdr_len <= 0:
            return []
        names = []
        for offset in range(hdr_len, min(size, len(raw)) - entry_len + 1, entry_len):
            pid, = struct.unpack_from("<i", raw, offset + 4)
            if pid == allocator_pid:
                name = raw[offset + 12:offset + entry_len].split(b"\0", 1)[0].decode("ascii", "replace")
                if re.fullmatch(r"/jack-\d+-\d+", name):
                    names.append(name[1:])
        return names
    except (OSError, struct.error):
        return []


def registered_servers(shm: str = "/dev/shm") -> list[tuple[int, str]]:
    """The registry's occupied server slots as (jackd pid, registered name ``jack-UID:NAME:``)."""
    try:
        with open(os.path.join(shm, "jack-shm-registry"), "rb") as f:
            head = f.read(24)
            _, _, hdr_len, _ = struct.unpack_from("<iiii", head, 8)
            slot = (hdr_len - 24) // 8
            table = f.read(8 * slot)
    except (OSError, struct.error):
        return []
    slots = []
    for index in range(8):
        raw = table[index * slot:(index + 1) * slot]
        if len(raw) < 4:
            break
        pid, = struct.unpack_from("<i", raw, 0)
        if pid > 0:
            slots.append((pid, raw[4:].split(b"\0", 1)[0].decode("ascii", "replace")))
    return slots


def reclaim_dead_server_slots(jackd_pid: int | None = None, shm: str = "/dev/shm") -> int:
    """Free the registry's server slots held by dead jackd processes (all of them, or only
    ``jackd_pid``'s); returns how many were freed.

    The registry has 8 server slots per machine (``MAX_SERVERS``), shared by every user of JACK. A
    jackd that exits cleanly frees its slot; a killed one keeps it until a server *of the same name*
    starts, so killed servers with unique names fill the table and then every jackd fails with "Too
    many servers already active" (seen here). Slot layout (jack2 ``shm.h``): ``hdr_len`` bytes of
    header whose server array starts at offset 24, 8 entries of (pid i32, name) each
    ``(hdr_len - 24) / 8`` bytes. Only slots whose pid is dead are touched (zeroed, as jackd does)."""
    path = os.path.join(shm, "jack-shm-registry")
    freed = 0
    try:
        with open(path, "r+b") as f:
            head = f.read(24)
            magic, = struct.unpack_from("<I", head, 0)
            _, _, hdr_len, _ = struct.unpack_from("<iiii", head, 8)
            slot = (hdr_len - 24) // 8
            if magic != 0x4A41434B or slot < 8:
                return 0
            for index in range(8):
                f.seek(24 + index * slot)
                pid, = struct.unpack("<i", f.read(4))
                if pid > 0 and (jackd_pid is None or pid == jackd_pid) and not _pid_alive(pid):
                    f.seek(24 + index * slot)
                    f.write(bytes(slot))
                    freed += 1
    except (OSError, struct.error):
        return freed
    return freed


def remove_server_files(server_name: str, jackd_pid: int | None = None, shm: str = "/dev/shm") -> list[str]:
    """Remove what a stopped jackd left under /dev/shm: its socket and semaphores (named after the
    server) and, given its (dead) pid, the segments the registry says it allocated -- ~100 MB each,
    left behind when jackd is killed rather than stopped -- and its registry slot (see
    `reclaim_dead_server_slots`). The registry itself and other servers' files stay. Returns the
    paths removed."""
    paths = []
    for pattern in (f"jack_{server_name}_*", f"jack_sem.*_{server_name}_*"):
        paths += glob.glob(os.path.join(shm, pattern))
    if jackd_pid is not None and not _pid_alive(jackd_pid):
        paths += [os.path.join(shm, name) for name in _registry_segments(jackd_pid, shm)]
        reclaim_dead_server_slots(jackd_pid, shm)
    removed = []
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AcousticJackEmulator:
    """The plant as a JACK client on server ``server_name`` (see the module docstring for the wiring).

    ``ref_latency_match=True`` copies the reference input to the reference output in the same block
    as the plant's outputs (same latency); ``False`` returns silence on the reference channel instead
    (a bench whose loopback cable is missing: the driver's ``connect()`` must time out clearly).
    ``portaudio_client`` is the regular expression of client names to wire (PortAudio and its
    renamed duplicates by default); ``auto_connect=False`` leaves wiring to the caller.
    ``blas_threads`` (default 1) limits the process's OpenBLAS threads while the emulator runs (see
    `limit_blas_threads`; the previous counts come back at `stop`); None leaves them alone."""

    def __init__(self, plant: Plant, *, server_name: str, client_name: str = "labpnn-plant",
                 ref_latency_match: bool = True, auto_connect: bool = True,
                 portaudio_client: str = r"PortAudio(?:-\d+)?", blas_threads: int | None = 1):
        self.plant = plant
        self.server_name = server_name
        self.client_name = client_name
        self.ref_latency_match = ref_latency_match
        self.auto_connect = auto_connect
        self.blas_threads = blas_threads
        self._blas_previous: list[int] = []
        self._portaudio = re.compile(rf"^(?P<client>{portaudio_client}):(?P<kind>in|out)_(?P<index>\d+)$")
        self.n_speakers, self.n_mics = int(plant.n_speakers), int(plant.n_mics)
        self.client: Any = None
        self.blocks = 0  #: process cycles run
        self.xruns = 0  #: xruns JACK reported to this client
        self.errors = 0  #: exceptions caught in the process callback
        self.nonfinite_blocks = 0  #: blocks whose drive had NaN/inf (zeroed: the plant's state stays finite)
        self.last_error: str | None = None
        self._stall_s = 0.0
        self._stall_lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._wired = threading.Condition()
        self.shutdown_reason: str | None = None  #: set if the JACK server went away under us
        self._drive = np.zeros((0, self.n_speakers), np.float32)

    # ----- lifecycle
    def start(self) -> AcousticJackEmulator:
        if self.client is not None:
            return self
        import jack

        try:
            client = jack.Client(self.client_name, no_start_server=True, servername=self.server_name)
        except jack.JackOpenError as exc:
            raise JackUnavailable(f"cannot open JACK client {self.client_name!r} on server "
                                  f"{self.server_name!r} (is jackd running?): {exc}") from exc
        try:
            if client.samplerate != int(self.plant.sample_rate):
                raise JackUnavailable(f"JACK server {self.server_name!r} runs at {client.samplerate} Hz but the "
                                      f"plant at {self.plant.sample_rate} Hz: start jackd with -r {self.plant.sample_rate}")
            self.speakers = [client.inports.register(f"speaker_{k + 1}") for k in range(self.n_speakers)]
            self.ref_in = client.inports.register("ref_in")
            self.mics = [client.outports.register(f"mic_{k + 1}") for k in range(self.n_mics)]
            self.ref_out = client.outports.register("ref_out")
            self._drive = np.zeros((client.blocksize, self.n_speakers), np.float32)
            client.set_process_callback(self._process)
            client.set_xrun_callback(self._on_xrun)
            client.set_shutdown_callback(self._on_shutdown)
            client.set_blocksize_callback(self._on_blocksize)
            if self.auto_connect:
                client.set_port_registration_callback(self._on_port_registration, only_available=False)
                client.set_port_connect_callback(self._on_port_connect, only_available=False)
            self._blas_previous = limit_blas_threads(self.blas_threads)  # before the first process call
            client.activate()
        except BaseException:
            client.close()
            restore_blas_threads(self._blas_previous)
            self._blas_previous = []
            raise
        self.client = client
        if self.auto_connect:
            self._worker = threading.Thread(target=self._wire_loop, name=f"{self.client_name}-wiring", daemon=True)
            self._worker.start()
            self._events.put("wire")  # PortAudio streams opened before we started
        return self

    def stop(self) -> None:
        client, self.client = self.client, None
        if self._worker is not None:
            self._events.put(None)
            self._worker.join(timeout=5)
            self._worker = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.deactivate()
            with contextlib.suppress(Exception):
                client.close()
            restore_blas_threads(self._blas_previous)
            self._blas_previous = []

    def __enter__(self) -> AcousticJackEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- facts
    @property
    def blocksize(self) -> int:
        return self.client.blocksize

    @property
    def latency_frames(self) -> int:
        """Frames from a sample played on PortAudio:out_* to its response on PortAudio:in_*: one JACK
        period (PortAudio's client closes the loop; the plant's own modes add their physical delay)."""
        return self.client.blocksize

    def stall(self, seconds: float) -> None:
        """Block the next process call for ``seconds`` (once): JACK reports an xrun."""
        with self._stall_lock:
            self._stall_s = float(seconds)

    def wait_wired(self, timeout_s: float = 5.0) -> bool:
        """Wait until every plant port is linked to a PortAudio port (the driver's stream is open with
        at least S + 1 playback and M + 1 capture channels, and wired). False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._wired:
            while not self._is_wired():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wired.wait(min(left, 0.1))
            return True

    def _is_wired(self) -> bool:
        client = self.client
        if client is None:
            return False
        try:
            return all(any(self._portaudio.match(p.name) for p in client.get_all_connections(port))
                       for port in (*self.speakers, self.ref_in, *self.mics, self.ref_out))
        except Exception:  # a port vanished while we looked: not wired (yet)
            return False

    # ----- the real-time part
    def _process(self, frames: int) -> None:
        try:
            if self._stall_s:
                with self._stall_lock:
                    stall, self._stall_s = self._stall_s, 0.0
                time.sleep(stall)
            drive = self._drive[:frames] if self._drive.shape[0] >= frames else np.zeros(
                (frames, self.n_speakers), np.float32)
            for k, port in enumerate(self.speakers):
                drive[:, k] = port.get_array()
            if not np.isfinite(drive).all():  # a stalled blocking-mode stream can emit garbage
                self.nonfinite_blocks += 1
                np.nan_to_num(drive, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
            response = np.asarray(self.plant.process(drive), dtype=np.float32)
            if response.shape != (frames, self.n_mics):
                raise ValueError(f"plant.process returned shape {response.shape}, expected {(frames, self.n_mics)}")
            for k, port in enumerate(self.mics):
                port.get_array()[:] = response[:, k]
            if self.ref_latency_match:
                self.ref_out.get_array()[:] = self.ref_in.get_array()
            else:
                self.ref_out.get_array().fill(0.0)
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.errors <= 3 or self.errors % 1000 == 0:  # the first few in full, then a heartbeat
                log.exception("acoustic emulator: process callback failed (%d so far); outputting silence",
                              self.errors)
            for port in (*self.mics, self.ref_out):
                with contextlib.suppress(Exception):
                    port.get_array().fill(0.0)
        finally:
            self.blocks += 1

    def _on_xrun(self, delay_usecs: float) -> None:
        self.xruns += 1

    def _on_shutdown(self, status, reason: str) -> None:
        self.shutdown_reason = reason
        log.error("acoustic emulator: JACK server shut down (%s)", reason)

    def _on_blocksize(self, blocksize: int) -> None:
        self._drive = np.zeros((blocksize, self.n_speakers), np.float32)

    # ----- wiring (notifications only queue work; the worker calls the JACK API)
    def _on_port_registration(self, port, register: bool) -> None:
        if port is None or self._portaudio.match(port.name):  # unregistering renumbers channels too
            self._events.put("wire")

    def _on_port_connect(self, a, b, connect: bool) -> None:
        if connect and a is not None and b is not None and (
                self._portaudio.match(a.name) or self._portaudio.match(b.name)):
            self._events.put("wire")

    def _wire_loop(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            while True:  # coalesce a burst of notifications into one pass
                try:
                    if self._events.get_nowait() is None:
                        return
                except queue.Empty:
                    break
            try:
                self.wire()
            except Exception:
                log.exception("acoustic emulator: wiring PortAudio's ports failed")
            with self._wired:
                self._wired.notify_all()

    def wire(self) -> None:
        """Make the graph what it should be: each PortAudio client's live ports wired to the plant's by
        channel, no PortAudio <-> ``system:*`` link, no stale link to the plant's ports."""
        import jack

        client = self.client
        if client is None:
            return
        ours_in = [*self.speakers, self.ref_in]
        ours_out = [*self.mics, self.ref_out]
        ours = {p.name for p in (*ours_in, *ours_out)}
        # PortAudio numbers ports with a counter that runs on across streams (the second stream's
        # are out_5.., not out_0..): channel k is the k-th live port of its client, in number order.
        live: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for name in self._port_names(client):
            match = self._portaudio.match(name)
            if match is not None:
                live.setdefault((match["client"], match["kind"]), []).append((int(match["index"]), name))
        wanted: dict[str, str] = {}  # PortAudio port -> the plant port it should be linked to
        for (_, kind), ports in live.items():
            targets = ours_in if kind == "out" else ours_out
            for channel, (_, name) in enumerate(sorted(ports)):
                if channel < len(targets):
                    wanted[name] = targets[channel].name
        for ports in live.values():
            for _, name in ports:
                kind_out = name.split(":", 1)[1].startswith("out")
                try:
                    linked = {p.name for p in client.get_all_connections(name)}
                    for other in linked:
                        if other.startswith("system:") or (other in ours and other != wanted.get(name)):
                            client.disconnect(*((name, other) if kind_out else (other, name)))
                    target = wanted.get(name)
                    if target is not None and target not in linked:
                        client.connect(*((name, target) if kind_out else (target, name)))
                except jack.JackError as exc:  # the stream closed under us: its ports are gone
                    log.debug("wiring %s: %s", name, exc)

    @staticmethod
    def _port_names(client) -> list[str]:
        """All port names now. (``Client.get_ports`` fails outright when one vanishes mid-listing,
        as PortAudio's do when a stream closes; retry, the next notification rewires anyway.)"""
        import jack

        for _ in range(20):
            try:
                return [p.name for p in client.get_ports(is_audio=True)]
            except jack.JackError:
                time.sleep(0.01)
        return []
