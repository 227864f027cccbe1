"""Rig configuration files: TOML, validated by pydantic, errors naming the bad field.

A config names the rig, how the device server listens, and the instruments::

    name = "test-rig"
    [server]
    bind = "tcp://127.0.0.1:5555"
    [rig]
    kind = "test"
    n_controls = 16

``build_rig(config)`` turns it into a connected-ready `Rig`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurveSection(Strict):
    """CurveZMQ: the server's secret key file and a directory of allowed client public keys."""

    server_secret_key: Path
    authorized_keys: Path


class ServerSection(Strict):
    bind: str = "tcp://127.0.0.1:5555"
    #: PUB socket for live batches and status; "" disables it
    publish: str = "tcp://127.0.0.1:5556"
    max_message_bytes: int = Field(256 * 2**20, gt=0)
    lease_s: float = Field(10.0, gt=0)
    reply_cache: int = Field(64, ge=1)
    #: batches expected to take at most this long (from the rig's recent seconds per row) run in the
    #: socket thread: a thread hand-off costs more than such a batch; 0 sends every batch to the worker
    inline_max_s: float = Field(0.002, ge=0, le=0.1)
    curve: CurveSection | None = None


class TestRigSection(Strict):
    kind: Literal["test"]
    n_controls: int = Field(16, gt=0, le=4096)
    n_outputs: int = Field(512, gt=0, le=1_000_000)
    hidden: int = Field(32, gt=0)
    noise: float = Field(0.01, ge=0)
    latency_s: float = Field(0.0, ge=0)
    zero_cost: bool = False
    max_mean_control: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class ShaperSection(Strict):
    """A WaveShaper (REST) whose channels carry the controls: x in [0, 1] per channel sets
    ``attn_db = attn_max_db * (1 - x) + attn_min_db * x`` over that channel's slice of the band."""

    url: str
    n_channels: int = Field(64, gt=0, le=4096)
    band_start_thz: float = Field(gt=0)
    band_stop_thz: float = Field(gt=0)
    attn_min_db: float = Field(0.0, ge=0, le=60)
    attn_max_db: float = Field(30.0, ge=0, le=60)
    attn_resolution_db: float = Field(0.01, gt=0)
    settle_s: float = Field(0.0, ge=0)
    #: safety: an attenuation floor for every channel (None: none)
    min_attn_db: float | None = Field(None, ge=0, le=60)
    #: safety: cap on the fraction of in-band power transmitted (None: none)
    max_total_transmission: float | None = Field(None, gt=0, le=1)
    timeout_s: float = Field(5.0, gt=0)


class OSASection(Strict):
    """An AQ6370-style OSA over PyVISA; wavelengths in nm (the driver speaks metres)."""

    resource: str
    start_nm: float = Field(gt=0)
    stop_nm: float = Field(gt=0)
    points: int = Field(512, ge=101, le=50001)
    resolution_nm: float | None = Field(None, gt=0)
    user: str | None = None
    password: str = ""
    #: "\n" for the emulator; a real AQ6370 on its LAN port speaks "\r\n"
    termination: str = "\n"
    timeout_s: float = Field(30.0, gt=0)
    sweep_timeout_s: float = Field(60.0, gt=0)
    full_scale_w: float | None = Field(None, gt=0)


class OpticalRigSection(Strict):
    kind: Literal["optical"]
    shaper: ShaperSection
    osa: OSASection


class MetasurfaceSection(Strict):
    """A metasurface controller on a serial line (the open-source RIS protocol): control j in [0, 1]
    drives meta-atom bits ``atoms[j * k:(j + 1) * k]``, quantised to ``2**k`` levels
    (``k = bits_per_control``; 1: one binary meta-atom per control)."""

    port: str  #: a serial device (/dev/ttyACM0, COM3) or a pyserial URL (socket://host:port)
    baud: int = Field(115200, gt=0)
    n_bits: int = Field(256, gt=0, le=4096)
    #: controller bits wired to meta-atoms, in control order (default: the first ones)
    atoms: list[int] | None = None
    bits_per_control: int = Field(1, ge=1, le=8)
    #: the safe state and the value of every unlisted bit: hex digits or None (all zeros)
    default_pattern: str | None = None
    settle_s: float = Field(0.002, ge=0)
    verify: bool = True  #: read the pattern back after every write
    timeout_s: float = Field(0.5, gt=0)
    retries: int = Field(0, ge=0, le=5)


class VNASection(Strict):
    """A vector network analyser measuring S21 (Keysight PNA or R&S ZNB SCPI over PyVISA)."""

    resource: str
    dialect: Literal["pna", "znb"] = "pna"
    start_hz: float = Field(gt=0)
    stop_hz: float = Field(gt=0)
    points: int = Field(20, ge=2, le=100001)
    if_bandwidth_hz: float = Field(10e3, gt=0)
    power_dbm: float = Field(-10.0, ge=-90, le=20)
    #: "db": |S21| in dB; "mag": |S21| linear; "reim": Re then Im (what a Touchstone export needs)
    output: Literal["db", "mag", "reim"] = "db"
    data_format: Literal["REAL,32", "REAL,64"] = "REAL,32"
    byte_order: Literal["SWAP", "NORM"] = "SWAP"
    #: some R&S models reverse the meaning of SWAP: the driver checks the byte order either way
    swap_reversed: bool = False
    timeout_s: float = Field(5.0, gt=0)


class MicrowaveRigSection(Strict):
    kind: Literal["microwave"]
    metasurface: MetasurfaceSection
    vna: VNASection


class AcousticSimulation(Strict):
    """No audio: the acoustic physics in-process on a simulated clock (`labpnn.drivers.audio_sim`),
    labelled as a simulation in describe(). For calibration sweeps, benchmarks and the demo."""

    preset: Literal["plate", "cavity"] = "cavity"
    seed: int = 0
    copy_seed: int = 0
    drift_scale: float = Field(1.0, ge=0)


class AcousticRigSection(Strict):
    """A sound card driving speakers and recording microphones on one clock
    (`labpnn.drivers.soundcard`), or its in-process simulation (``[rig.simulation]``). ``plan`` is
    the shot (`labpnn.drivers.audio_shots.ShotPlan` fields: encoding, tones_hz, channels, times,
    max_amplitude, ...)."""

    kind: Literal["acoustic"]
    device: str = "system"  #: the sound card, by name (PortAudio's device name)
    plan: dict = Field(default_factory=dict)
    max_peak: float | list[float] = 0.9  #: per output channel (speakers, then the reference), full scale
    max_rms: float | list[float] = 0.5
    keep_waveforms: bool = False  #: keep each batch's raw recordings (the driver's last_recordings)
    max_failures: int = Field(3, ge=1, le=20)  #: bad shots in a row that end a batch
    connect_timeout_s: float = Field(10.0, gt=0)
    simulation: AcousticSimulation | None = None


RigSection = Annotated[TestRigSection | OpticalRigSection | MicrowaveRigSection | AcousticRigSection,
                       Field(discriminator="kind")]


class NetworkDefaults(Strict):
    """How a network should use this rig unless the trainer's caller says otherwise — the bench's
    knowledge of its own channels (which carry inputs well, which parameters): served in describe()
    as ``network`` and used by `labpnn.training.defaults` before its generic rules."""

    repeat: int | None = Field(None, ge=1, le=64)  #: control channels per input feature
    layout: str | None = None  #: `labpnn.training.network.assign_channels` layout
    pooling: str | None = None
    #: the twin's core (`labpnn.twin.model.CORES`): "modulus" for magnitudes of coherent fields
    twin_core: Literal["residual_mlp", "modulus"] | None = None


class RigConfig(Strict):
    name: str = "rig"
    server: ServerSection = ServerSection()
    rig: RigSection
    network: NetworkDefaults | None = None


class ConfigError(ValueError):
    """A rig config that cannot be used; the message names the file and the field."""


def parse_config(data: dict, source: str = "<config>") -> RigConfig:
    try:
        return RigConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path) -> RigConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such rig config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))


def build_rig(config: RigConfig):
    """The `Rig` a config describes (not yet connected)."""
    from labpnn.rig import Rig as _Rig

    network = config.network.model_dump(exclude_none=True) if config.network is not None else None

    def Rig(actuators, sensors, *, name):  # noqa: N802 - every rig kind gets the [network] table
        return _Rig(actuators, sensors, name=name, network=network)

    section = config.rig
    if section.kind == "test":
        from labpnn.sim_instruments.test_rig import SimTestRig

        system = SimTestRig(**section.model_dump(exclude={"kind"}))
        return Rig([system], [system], name=config.name)
    if section.kind == "optical":
        from labpnn.drivers.aq6370 import OSASensor
        from labpnn.drivers.waveshaper import ShaperActuator, WaveShaperClient

        sh, osa = section.shaper, section.osa
        shaper = ShaperActuator(
            WaveShaperClient(sh.url, timeout=sh.timeout_s), sh.n_channels, sh.band_start_thz,
            sh.band_stop_thz, attn_min_db=sh.attn_min_db, attn_max_db=sh.attn_max_db,
            attn_resolution_db=sh.attn_resolution_db, settle_s=sh.settle_s, min_attn_db=sh.min_attn_db,
            max_total_transmission=sh.max_total_transmission,
        )
        sensor = OSASensor(
            osa.resource, user=osa.user, password=osa.password, read_termination=osa.termination,
            write_termination=osa.termination, timeout_s=osa.timeout_s,
            sweep_timeout_s=osa.sweep_timeout_s, start_m=osa.start_nm * 1e-9, stop_m=osa.stop_nm * 1e-9,
            points=osa.points, resolution_m=None if osa.resolution_nm is None else osa.resolution_nm * 1e-9,
            full_scale_w=osa.full_scale_w,
        )
        return Rig([shaper], [sensor], name=config.name)
    if section.kind == "microwave":
        from labpnn.drivers.metasurface import MetasurfaceActuator
        from labpnn.drivers.vna import VNASensor

        ms, vna = section.metasurface, section.vna
        actuator = MetasurfaceActuator(
            ms.port, n_bits=ms.n_bits, atoms=ms.atoms, bits_per_control=ms.bits_per_control,
            default_pattern=ms.default_pattern, settle_s=ms.settle_s, verify=ms.verify, baud=ms.baud,
            timeout_s=ms.timeout_s, retries=ms.retries)
        sensor = VNASensor(
            vna.resource, dialect=vna.dialect, output=vna.output, start_hz=vna.start_hz, stop_hz=vna.stop_hz,
            points=vna.points, if_bandwidth_hz=vna.if_bandwidth_hz, power_dbm=vna.power_dbm,
            data_format=vna.data_format, byte_order=vna.byte_order, swap_reversed=vna.swap_reversed,
            timeout_s=vna.timeout_s)
        return Rig([actuator], [sensor], name=config.name)
    if section.kind == "acoustic":
        from labpnn.drivers.audio_shots import ShotPlan

        try:
            plan = ShotPlan(**section.plan)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"rig.plan: {exc}") from None
        if section.simulation is not None:
            from labpnn.drivers.audio_sim import SimulatedAudioPath
            from labpnn.sim_instruments.acoustic import AcousticConfig, AcousticPlant

            sim = section.simulation
            physics = getattr(AcousticConfig, sim.preset)(seed=sim.seed, copy_seed=sim.copy_seed,
                                                           drift_scale=sim.drift_scale)
            card = SimulatedAudioPath(AcousticPlant(physics), plan, max_peak=section.max_peak, max_rms=section.max_rms)
        else:
            from labpnn.drivers.soundcard import AcousticSoundCard

            card = AcousticSoundCard(section.device, plan, max_peak=section.max_peak, max_rms=section.max_rms,
                                     keep_waveforms=section.keep_waveforms, max_failures=section.max_failures,
                                     connect_timeout_s=section.connect_timeout_s)
        return Rig([card], [card], name=config.name)
    raise ConfigError(f"rig kind {section.kind!r} is not supported")
