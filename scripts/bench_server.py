#!/usr/bin/env python
"""Transport benchmark: what the device server costs over raw ZeroMQ.

For B x S in {1x512, 64x2048, 256x2048} float32 (C = 16) on the zero-cost test rig:
  (a) in-process ``Rig.run``
  (b) raw pyzmq DEALER/ROUTER echo: the same request bytes out, the same reply bytes back
      (traces + applied + timestamps + flags), no decoding, no rig
  (e) the floor of any Python implementation: a server and client that only parse the JSON header
      and wrap the arrays (no validation, no rig, no bookkeeping) and answer with the same frames
  (c) labpnn DeviceServer + RigClient
  (d) (c) with CURVE
Throughput (batches/s, 4 requests in flight for b, c, d) and lockstep round-trip latency (median
per call). Servers run in their own processes, as in the lab. Repeats are interleaved (every
method once per repeat, in turn) and the table shows medians over repeats.

    python scripts/bench_server.py            # ~1-2 minutes
    python scripts/bench_server.py --quick    # ~20 s
    python scripts/bench_server.py --steps    # 64x2048 throughput: the floor plus labpnn's work, step by step
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

C = 16
SIZES = [(1, 512), (64, 2048), (256, 2048)]
IN_FLIGHT = 4


# -- server processes -------------------------------------------------------------------------------
def _reply_header(rid: str, rows: int, s: int) -> bytes:
    import orjson

    return orjson.dumps({"kind": "reply", "id": rid, "ok": True,
                         "result": {"n_rows": rows, "n_done": rows, "batch": 0, "busy_s": 0.0}, "error": None,
                         "arrays": [{"name": "traces", "dtype": "float32", "shape": [rows, s]},
                                    {"name": "applied", "dtype": "float32", "shape": [rows, C]},
                                    {"name": "timestamps", "dtype": "float64", "shape": [rows]},
                                    {"name": "flags", "dtype": "uint32", "shape": [rows]}]})


#: what labpnn must do per request on top of the floor, added one step at a time (``--steps``)
STEPS = ("floor", "+ request validated (pydantic, arrays checked)", "+ Rig.measure (validation, timestamps)",
         "+ reply encoded (codec)", "+ reply cached (retries)", "+ reply validated by the client (codec)",
         "labpnn DeviceServer + RigClient")


def _serve_floor(s: int, step: int = 0) -> None:
    """(e): parse the header, wrap the controls, answer with zero traces: nothing a real server
    could leave out. ``step`` > 0 adds labpnn's own work, step by step (`STEPS`)."""
    import collections

    import orjson

    from labpnn.protocols.codec import decode_request, encode_reply
    from labpnn.rig import Rig
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(C, s, zero_cost=True)
    rig = Rig([sim], [sim]).connect()
    cache: collections.OrderedDict = collections.OrderedDict()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    print(json.dumps({"address": sock.getsockopt(zmq.LAST_ENDPOINT).decode()}), flush=True)
    zeros: dict[int, np.ndarray] = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        if step >= 1:
            request, arrays = decode_request(frames[1:])
            rid, x = request.id, arrays["controls"]
        else:
            header = orjson.loads(frames[2].bytes)
            rid, x = header["id"], np.frombuffer(frames[3].buffer, np.float32).reshape(header["arrays"][0]["shape"])
        rows = x.shape[0]
        if step >= 2:
            m = rig.measure(x)
            traces, applied, stamps, flags = m.traces, m.applied, m.timestamps, m.flags
        else:
            traces = zeros.get(rows)
            if traces is None:
                traces = zeros[rows] = np.zeros((rows, s), np.float32)
            applied, stamps, flags = x, np.full(rows, time.time()), np.zeros(rows, np.uint32)
        if step >= 3:
            reply = encode_reply(rid, result={"n_rows": rows, "n_done": rows, "batch": 0, "busy_s": 0.0},
                                 arrays={"traces": traces, "applied": applied, "timestamps": stamps, "flags": flags})
        else:
            reply = [b"LPNN1", _reply_header(rid, rows, s), traces.data, applied.data, stamps.data, flags.data]
        sock.send_multipart([frames[0], *reply], copy=False)
        if step >= 4:
            cache[rid] = reply
            while len(cache) > 64:
                cache.popitem(last=False)


def _serve_echo() -> None:
    """ROUTER that answers each request with a prebuilt reply of the matching size."""
    from labpnn.protocols.codec import encode_reply

    replies = {}
    for rows, s in SIZES:
        frames = encode_reply("x", result={"n_rows": rows, "n_done": rows, "batch": 0, "busy_s": 0.0}, arrays={
            "traces": np.zeros((rows, s), np.float32), "applied": np.zeros((rows, C), np.float32),
            "timestamps": np.zeros(rows), "flags": np.zeros(rows, np.uint32)})
        replies[rows * C * 4] = [bytes(f) if not isinstance(f, bytes) else f for f in frames]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    print(json.dumps({"address": sock.getsockopt(zmq.LAST_ENDPOINT).decode()}), flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        reply = replies.get(len(frames[-1]))
        if reply is None:
            return
        sock.send_multipart([frames[0], *reply], copy=False)


def _serve_labpnn(n_outputs: int, curve_dir: str | None) -> None:
    from labpnn.config import ServerSection
    from labpnn.remote.server import DeviceServer
    from labpnn.rig import Rig
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(C, n_outputs, zero_cost=True)
    rig = Rig([sim], [sim]).connect()
    server = DeviceServer(rig, ServerSection(bind="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*"),
                          curve_keys=curve_dir)
    server.start()
    print(json.dumps({"address": server.address}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


def _spawn(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, json.loads(line)["address"]


# -- measurements --------------------------------------------------------------------------------------
def _timed(fn, seconds: float) -> tuple[float, float]:
    """(calls per second, median seconds per call) of fn() run for ``seconds``."""
    times = []
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end or len(times) < 3:
        fn()
        t = time.perf_counter()
        times.append(t - now)
        now = t
    return len(times) / (now - start), statistics.median(times)


def bench_inprocess(rows, s, seconds):
    from labpnn.rig import Rig
    from labpnn.sim_instruments.test_rig import SimTestRig

    sim = SimTestRig(C, s, zero_cost=True)
    rig = Rig([sim], [sim]).connect()
    x = np.random.default_rng(0).random((rows, C), np.float32)
    rate, lat = _timed(lambda: rig.run(x), seconds)
    return rate, lat


class RawClient:
    """(b): the same request bytes out, the reply bytes back, nothing decoded."""

    def __init__(self, address):
        from labpnn.protocols.codec import encode_request

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.requests = {rows: encode_request("run", {}, {"controls": np.random.default_rng(0).random(
            (rows, C), np.float32)}, id="x", token="t") for rows, _ in SIZES}

    def _send(self, rows):
        self.sock.send_multipart(self.requests[rows], copy=False)

    def _recv(self):
        return self.sock.recv_multipart(copy=False)

    def lockstep(self, rows, seconds):
        def once():
            self._send(rows)
            self._recv()
        return _timed(once, seconds)[1]

    def throughput(self, rows, seconds):
        for _ in range(IN_FLIGHT):
            self._send(rows)
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            self._recv()
            n += 1
            if time.perf_counter() >= end:
                break
            self._send(rows)
        for _ in range(IN_FLIGHT - 1):
            self._recv()
        return n / (time.perf_counter() - start)


class FloorClient(RawClient):
    """(e): encode the header, receive, parse it, wrap the arrays; nothing else (``codec``: decode
    the reply with labpnn's codec instead)."""

    def __init__(self, address, codec: bool = False):
        super().__init__(address)
        self.codec = codec
        self.controls = {rows: np.random.default_rng(0).random((rows, C), np.float32) for rows, _ in SIZES}
        self.n = 0

    def _send(self, rows):
        import orjson

        x = self.controls[rows]
        self.n += 1
        self.sock.send_multipart([b"LPNN1", orjson.dumps({
            "id": f"f-{self.n}", "op": "run", "token": "t", "args": {},
            "arrays": [{"name": "controls", "dtype": "float32", "shape": list(x.shape)}]}), x.data], copy=False)

    def _recv(self):
        import orjson

        frames = self.sock.recv_multipart(copy=False)
        if self.codec:
            from labpnn.protocols.codec import decode_reply

            return decode_reply(frames)
        header = orjson.loads(frames[1].bytes)
        return [np.frombuffer(f.buffer, np.dtype(spec["dtype"])).reshape(spec["shape"])
                for spec, f in zip(header["arrays"], frames[2:], strict=True)]


class LabpnnBench:
    def __init__(self, address, curve=None):
        from labpnn.remote.client import RigClient

        kwargs = {}
        if curve:
            kwargs = {"server_public_key": curve / "server.key", "client_keys": curve / "bench.key_secret"}
        self.client = RigClient(address, timeout_s=30, **kwargs)
        self.client.lock()

    def lockstep(self, rows, seconds):
        x = np.random.default_rng(0).random((rows, C), np.float32)
        return _timed(lambda: self.client.measure(x), seconds)[1]

    def throughput(self, rows, seconds):
        x = np.random.default_rng(0).random((rows, C), np.float32)
        end = time.perf_counter() + seconds

        def batches():
            while time.perf_counter() < end:
                yield x
        n = 0
        start = time.perf_counter()
        for _ in self.client.measure_many(batches(), max_in_flight=IN_FLIGHT):
            n += 1
        return n / (time.perf_counter() - start)


def steps(repeats: int, seconds: float) -> int:
    """The floor, then labpnn's work added one step at a time, then labpnn itself: 64x2048
    throughput, interleaved repeats, medians, as fractions of the raw echo and of the floor."""
    rows, s = 64, 2048
    procs, runners = [], {}
    try:
        proc, addr = _spawn("echo")
        procs.append(proc)
        echo = RawClient(addr)
        for step in range(5):
            proc, addr = _spawn("floor", str(s), str(step))
            procs.append(proc)
            runners[step] = FloorClient(addr)
        runners[5] = FloorClient(addr, codec=True)  # the last floor server, the codec's client
        proc, addr = _spawn("labpnn", str(s))
        procs.append(proc)
        runners[6] = LabpnnBench(addr)
        rates: dict[int, list[float]] = {k: [] for k in (-1, *runners)}
        for rep in range(repeats):
            rates[-1].append(echo.throughput(rows, seconds))
            for step, runner in runners.items():
                rates[step].append(runner.throughput(rows, seconds))
            print(f"repeat {rep + 1}/{repeats} done", file=sys.stderr)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"\n{rows} x {s} throughput, {IN_FLIGHT} in flight, {repeats} interleaved repeats x {seconds:g} s, medians\n")
        print(f"{'':52} {'batches/s':>10} {'/echo':>7} {'/floor':>7}")
        print(f"{'raw pyzmq echo':52} {med[-1]:>10.0f} {1:>7.2f} {med[-1] / med[0]:>7.2f}")
        for step, name in enumerate(STEPS):
            print(f"{name:52} {med[step]:>10.0f} {med[step] / med[-1]:>7.2f} {med[step] / med[0]:>7.2f}")
        runners[6].client.close()
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (3 repeats x 0.2 s)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--steps", action="store_true",
                        help="64x2048 throughput of the Python floor with labpnn's work added step by step")
    parser.add_argument("--serve", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        if args.serve[0] == "echo":
            _serve_echo()
        elif args.serve[0] == "floor":
            _serve_floor(int(args.serve[1]), int(args.serve[2]) if len(args.serve) > 2 else 0)
        else:
            _serve_labpnn(int(args.serve[1]), args.serve[2] if len(args.serve) > 2 else None)
        return 0
    repeats = args.repeats or (3 if args.quick else 7)
    seconds = args.seconds or (0.2 if args.quick else 0.5)
    if args.steps:
        return steps(repeats, seconds)

    tmp = tempfile.TemporaryDirectory()
    keys = Path(tmp.name)
    from labpnn.remote.security import create_key_pair

    create_key_pair("server", keys)
    (keys / "authorized").mkdir()
    create_key_pair("bench", keys)
    shutil.copy(keys / "bench.key", keys / "authorized" / "bench.key")

    procs, endless = [], []
    try:
        echo_proc, echo_addr = _spawn("echo")
        procs.append(echo_proc)
        endless.append(echo_proc)
        servers, curve_servers, floors = {}, {}, {}
        for s in sorted({s for _, s in SIZES}):
            proc, addr = _spawn("floor", str(s))
            procs.append(proc)
            endless.append(proc)
            floors[s] = FloorClient(addr)
            proc, addr = _spawn("labpnn", str(s))
            procs.append(proc)
            servers[s] = LabpnnBench(addr)
            proc, addr = _spawn("labpnn", str(s), str(keys))
            procs.append(proc)
            curve_servers[s] = LabpnnBench(addr, keys)
        raw = RawClient(echo_addr)
        results: dict[tuple, list[float]] = {}

        def add(key, value):
            results.setdefault(key, []).append(value)

        for rep in range(repeats):
            for rows, s in SIZES:
                size = (rows, s)
                rate, lat = bench_inprocess(rows, s, seconds)
                add((size, "a", "thr"), rate)
                add((size, "a", "lat"), lat)
                add((size, "b", "thr"), raw.throughput(rows, seconds))
                add((size, "b", "lat"), raw.lockstep(rows, seconds))
                add((size, "e", "thr"), floors[s].throughput(rows, seconds))
                add((size, "e", "lat"), floors[s].lockstep(rows, seconds))
                add((size, "c", "thr"), servers[s].throughput(rows, seconds))
                add((size, "c", "lat"), servers[s].lockstep(rows, seconds))
                add((size, "d", "thr"), curve_servers[s].throughput(rows, seconds))
                add((size, "d", "lat"), curve_servers[s].lockstep(rows, seconds))
            print(f"repeat {rep + 1}/{repeats} done", file=sys.stderr)

        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\nbench_server: {repeats} interleaved repeats x {seconds:g} s, medians; C={C}; "
              f"{IN_FLIGHT} in flight for throughput; servers in separate processes\n")
        print("throughput, batches/s")
        print(f"{'B x S':>10} {'a in-proc':>10} {'b raw zmq':>10} {'e floor':>10} {'c labpnn':>10} {'d +CURVE':>10} "
              f"{'e/b':>6} {'c/b':>6} {'d/b':>6} {'c/e':>6} {'c MB/s':>8}")
        for rows, s in SIZES:
            v = {m: med[((rows, s), m, "thr")] for m in "abcde"}
            mb = v["c"] * rows * s * 4 / 1e6
            print(f"{rows:>4} x {s:<4} {v['a']:>10.0f} {v['b']:>10.0f} {v['e']:>10.0f} {v['c']:>10.0f} "
                  f"{v['d']:>10.0f} {v['e'] / v['b']:>6.2f} {v['c'] / v['b']:>6.2f} {v['d'] / v['b']:>6.2f} "
                  f"{v['c'] / v['e']:>6.2f} {mb:>8.0f}")
        print("\nlockstep round trip, microseconds (median)")
        print(f"{'B x S':>10} {'a in-proc':>10} {'b raw zmq':>10} {'e floor':>10} {'c labpnn':>10} {'d +CURVE':>10} "
              f"{'e/b':>6} {'c/b':>6} {'d/b':>6} {'c/e':>6}")
        for rows, s in SIZES:
            v = {m: med[((rows, s), m, "lat")] * 1e6 for m in "abcde"}
            print(f"{rows:>4} x {s:<4} {v['a']:>10.0f} {v['b']:>10.0f} {v['e']:>10.0f} {v['c']:>10.0f} "
                  f"{v['d']:>10.0f} {v['e'] / v['b']:>6.2f} {v['c'] / v['b']:>6.2f} {v['d'] / v['b']:>6.2f} "
                  f"{v['c'] / v['e']:>6.2f}")
        thr = med[((64, 2048), "c", "thr")] / med[((64, 2048), "b", "thr")]
        lat = med[((1, 512), "c", "lat")] / med[((1, 512), "b", "lat")]
        print(f"\ntargets: throughput c/b at 64x2048 = {thr:.2f} (>= 0.85: {'met' if thr >= 0.85 else 'MISSED'}); "
              f"latency c/b at 1x512 = {lat:.2f} (<= 1.3: {'met' if lat <= 1.3 else 'MISSED'})")
        for bench in [*servers.values(), *curve_servers.values()]:
            bench.client.close()
        raw.sock.close()
        raw.ctx.term()
        for floor in floors.values():
            floor.sock.close()
    finally:
        for proc in endless:  # the echo and floor servers read no stdin
            proc.terminate()
        for proc in procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
