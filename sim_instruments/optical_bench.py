"""The simulated optical bench: a WaveShaper emulator and an AQ6370 emulator sharing one light path.

The OSA sees what the shaper currently shapes: both drive the same `SHGBench`. Everything binds
127.0.0.1 unless told otherwise. Run it as ``labpnn sim optical`` or
``python -m labpnn.sim_instruments.optical_bench --shaper-port 18300 --osa-port 18301``; it prints
the two addresses and serves until SIGINT/SIGTERM (exit status 0).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .aq6370_emulator import AQ6370Emulator
from .serving import stop_on_signals
from .shg import OpticalBenchConfig, SHGBench
from .waveshaper_emulator import WaveShaperEmulator

__all__ = ["OpticalBenchEmulators", "main", "DEFAULT_SHAPER_PORT", "DEFAULT_OSA_PORT"]

DEFAULT_SHAPER_PORT = 18300
DEFAULT_OSA_PORT = 18301


class OpticalBenchEmulators:
    """Both emulators on one `SHGBench`. Ports 0 pick free ports (read them back after `start`)."""

    def __init__(
        self,
        config: OpticalBenchConfig | None = None,
        shaper_port: int = DEFAULT_SHAPER_PORT,
        osa_port: int = DEFAULT_OSA_PORT,
        settle_s: float = 0.0,
        sweep_s: float = 0.0,
        require_login: bool = False,
        password: str | None = None,
        host: str = "127.0.0.1",
    ):
        self.bench = SHGBench(config)
        self.shaper = WaveShaperEmulator(self.bench, host=host, port=shaper_port, settle_s=settle_s)
        self.osa = AQ6370Emulator(
            self.bench, host=host, port=osa_port, sweep_s=sweep_s, require_login=require_login, password=password
        )

    def start(self) -> OpticalBenchEmulators:
        self.shaper.start()
        try:
            self.osa.start()
        except BaseException:
            self.shaper.stop()
            raise
        return self

    def stop(self) -> None:
        self.osa.stop()
        self.shaper.stop()

    def __enter__(self) -> OpticalBenchEmulators:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def shaper_url(self) -> str:
        """``http://127.0.0.1:PORT``"""
        return self.shaper.url

    @property
    def osa_resource(self) -> str:
        """``TCPIP::127.0.0.1::PORT::SOCKET``"""
        return self.osa.resource


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labpnn sim optical",
        description="Simulated optical bench: WaveShaper (REST) + AQ6370 OSA (SCPI socket) on one SHG light path.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--shaper-port", type=int, default=DEFAULT_SHAPER_PORT, help="WaveShaper HTTP port (0 = any)")
    p.add_argument("--osa-port", type=int, default=DEFAULT_OSA_PORT, help="OSA SCPI port (0 = any)")
    p.add_argument("--settle-ms", type=float, default=0.0, help="shaper mask settle time per load (ms)")
    p.add_argument("--sweep-ms", type=float, default=0.0, help="OSA sweep time (ms)")
    p.add_argument("--seed", type=int, default=0, help="physics seed (noise and drift)")
    p.add_argument("--login", action="store_true", help='require the OSA LAN login (OPEN "user" / password)')
    p.add_argument("--password", default=None, help="OSA login password (default: any)")
    p.add_argument("--noise-scale", type=float, default=1.0, help="detector noise multiplier")
    p.add_argument("--drift-scale", type=float, default=1.0, help="drift multiplier")
    p.add_argument("--no-gap", action="store_true", help="turn the deliberate model gap off")
    p.add_argument("--copy-seed", type=int, default=0,
                   help="which copy of the bench (0: the nominal one; others differ in fabrication details)")
    p.add_argument("--copy-variation", type=float, default=1.0, help="copy-to-copy variation multiplier")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.settle_ms, args.sweep_ms, args.noise_scale, args.drift_scale, args.copy_variation) < 0:
        print("error: times and scales must be >= 0", file=sys.stderr)
        return 2
    config = replace(
        OpticalBenchConfig(),
        seed=args.seed,
        noise_scale=args.noise_scale,
        drift_scale=args.drift_scale,
        model_gap=not args.no_gap,
        copy_seed=args.copy_seed,
        copy_variation=args.copy_variation,
    )
    bench = OpticalBenchEmulators(
        config,
        shaper_port=args.shaper_port,
        osa_port=args.osa_port,
        settle_s=args.settle_ms / 1e3,
        sweep_s=args.sweep_ms / 1e3,
        require_login=args.login,
        password=args.password,
        host=args.host,
    )
    with stop_on_signals() as stop:
        try:
            bench.start()
        except OSError as exc:
            print(f"error: cannot bind: {exc}", file=sys.stderr)
            return 1
        try:
            print(f"waveshaper {bench.shaper_url}", flush=True)
            print(f"osa {bench.osa_resource}", flush=True)
            if not bench.bench.fabrication.nominal:
                fab = bench.bench.fabrication.summary()
                print("copy " + " ".join(f"{k}={v:.6g}" for k, v in fab.items()), flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            bench.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
