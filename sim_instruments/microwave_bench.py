"""The simulated microwave bench: a metasurface cavity, its RIS controller on a pseudo-terminal and a
VNA on a TCP socket.

The VNA measures what the controller makes the cavity see: its ``pattern_source`` is the
controller's ``pattern_at``, so a sweep started before a new pattern has settled (``settle_s``
after the controller's ``#OK``) measures the old one. Everything binds 127.0.0.1 unless told
otherwise. Run it as ``labpnn sim microwave`` or
``python -m labpnn.sim_instruments.microwave_bench --vna-port 18310``; it prints the two addresses
(``vna TCPIP::...::SOCKET`` and ``metasurface /dev/pts/N``) and serves until SIGINT/SIGTERM
(exit status 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .metasurface_controller import MetasurfaceControllerEmulator
from .serving import stop_on_signals
from .vna_emulator import DIALECTS, VNAEmulator

__all__ = ["MicrowaveBenchEmulators", "main", "DEFAULT_VNA_PORT"]

DEFAULT_VNA_PORT = 18310
DEFAULT_SERIAL_LINK = "/tmp/labpnn-metasurface"


class MicrowaveBenchEmulators:
    """Cavity + controller emulator + VNA emulator. ``vna_port=0`` picks a free port (read
    `vna_resource` after `start`); the controller's pty path is `serial_port` after `start`.

    :param cavity_config: a ``CavityConfig`` for ``MetasurfaceCavity`` (None: its defaults).
    :param cavity: an already built cavity (anything with ``n_meta`` and ``measure``) instead.
    :param atoms: controller bits wired to the meta-atoms (default the first ``n_meta``).
    """

    def __init__(self, cavity_config: Any = None, *, vna_port: int = 0, settle_s: float = 0.002,
                 baud: int = 115200, dialect: str = "pna", host: str = "127.0.0.1", n_bits: int = 256,
                 atoms=None, cavity: Any = None, swap_reversed: bool = False):
        if cavity is None:
            from .metasurface_cavity import MetasurfaceCavity  # the physics, built only when needed

            cavity = MetasurfaceCavity(cavity_config) if cavity_config is not None else MetasurfaceCavity()
        self.cavity = cavity
        self.controller = MetasurfaceControllerEmulator(n_bits, baud=baud, settle_s=settle_s)
        self.vna = VNAEmulator(cavity, self.controller.pattern_at, host=host, port=vna_port, dialect=dialect,
                               atoms=atoms, swap_reversed=swap_reversed)

    def start(self) -> MicrowaveBenchEmulators:
        self.controller.start()
        try:
            self.vna.start()
        except BaseException:
            self.controller.stop()
            raise
        return self

    def stop(self) -> None:
        self.vna.stop()
        self.controller.stop()

    def __enter__(self) -> MicrowaveBenchEmulators:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def vna_resource(self) -> str:
        """``TCPIP::127.0.0.1::PORT::SOCKET``"""
        return self.vna.resource

    @property
    def serial_port(self) -> str:
        """The controller's pseudo-terminal path (for pyserial)."""
        return self.controller.port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labpnn sim microwave",
        description="Simulated microwave bench: metasurface cavity, RIS controller (serial, pty) and VNA (SCPI socket).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the VNA binds (default 127.0.0.1)")
    p.add_argument("--vna-port", type=int, default=DEFAULT_VNA_PORT, help="VNA SCPI port (0 = any)")
    p.add_argument("--dialect", choices=sorted(DIALECTS), default="pna", help="VNA command set")
    p.add_argument("--settle-ms", type=float, default=2.0, help="metasurface settle time after #OK (ms)")
    p.add_argument("--baud", type=int, default=115200, help="controller line rate (sets its wire time)")
    p.add_argument("--link", default=DEFAULT_SERIAL_LINK,
                   help="a symlink to the controller's pseudo-terminal, so a config can name a fixed port "
                        f"(default {DEFAULT_SERIAL_LINK}; '' for none)")
    p.add_argument("--seed", type=int, default=0, help="physics seed (noise and drift)")
    p.add_argument("--copy-seed", type=int, default=0, help="which copy of the cavity (fabrication details; 0 nominal)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.settle_ms < 0 or args.baud <= 0:
        print("error: --settle-ms must be >= 0 and --baud > 0", file=sys.stderr)
        return 2
    from .metasurface_cavity import CavityConfig

    bench = MicrowaveBenchEmulators(CavityConfig(seed=args.seed, copy_seed=args.copy_seed), vna_port=args.vna_port,
                                    settle_s=args.settle_ms / 1e3, baud=args.baud, dialect=args.dialect,
                                    host=args.host)
    with stop_on_signals() as stop:
        try:
            bench.start()
        except OSError as exc:
            print(f"error: cannot start: {exc}", file=sys.stderr)
            return 1
        link = None
        if args.link:
            link = Path(args.link)
            if link.is_symlink() or not link.exists():
                link.unlink(missing_ok=True)
                link.symlink_to(bench.serial_port)
            else:
                print(f"error: {link} exists and is not a symlink; not replacing it", file=sys.stderr)
                link = None
        try:
            print(f"vna {bench.vna_resource}", flush=True)
            print(f"metasurface {bench.serial_port}" + (f" (also {link})" if link else ""), flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            if link is not None and link.is_symlink():
                link.unlink(missing_ok=True)
            bench.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
