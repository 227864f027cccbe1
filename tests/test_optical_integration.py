"""The optical drivers against their emulators over real sockets, and the whole optical stack:
RigClient -> device server -> Rig -> drivers -> emulators -> physics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from labpnn.config import build_rig, load_config
from labpnn.drivers.aq6370 import OSASensor
from labpnn.drivers.roles import FLAG_QUANTISED
from labpnn.drivers.waveshaper import InvalidAttenuationError, WaveShaperClient
from labpnn.sim_instruments.optical_bench import OpticalBenchEmulators


@pytest.fixture
def emulators():
    with OpticalBenchEmulators(shaper_port=0, osa_port=0) as emu:
        yield emu


def optical_config(emu, **osa):
    config = load_config("examples/optical-sim.toml")
    config.rig.shaper.url = emu.shaper_url
    config.rig.osa.resource = emu.osa_resource
    for key, value in osa.items():
        setattr(config.rig.osa, key, value)
    return config


def test_waveshaper_driver_round_trips_a_profile(emulators):
    client = WaveShaperClient(emulators.shaper_url)
    info = client.devinfo()
    assert info["startfreq"] < 191.48 and info["stopfreq"] > 195.32
    freq = np.round(np.arange(192.0, 193.0, 0.001), 3)
    attn = np.linspace(0, 20, freq.size).round(3)
    client.load_profile(freq, attn, np.zeros_like(freq), 1)
    profile = client.get_profile()
    listed = np.isin(np.round(profile.freq_thz, 3), freq)
    np.testing.assert_allclose(profile.attn_db[listed], attn, atol=1e-3)


def test_waveshaper_vendor_error_becomes_exception(emulators):
    client = WaveShaperClient(emulators.shaper_url)
    with pytest.raises(InvalidAttenuationError) as err:
        client.load_wsp("".join(f"{192 + i / 1000:.3f}\t-5.0\t0.0\t1\n" for i in range(20)))
    assert err.value.rc == -31
    client.transmit()  # still serving


def test_osa_driver_reads_axis_and_traces(emulators):
    sensor = OSASensor(emulators.osa_resource, start_m=770e-9, stop_m=780e-9, points=512)
    sensor.connect()
    try:
        axis = sensor.axis()
        assert axis["unit"] == "m" and len(axis["values"]) == 512
        assert axis["values"][0] == pytest.approx(770e-9) and axis["values"][-1] == pytest.approx(780e-9)
        trace, flags = sensor.acquire()
        assert trace.dtype == np.float32 and trace.shape == (512,) and flags == 0
        sensor.configure(data_format="REAL,64")
        trace64, _ = sensor.acquire()
        assert trace64.shape == (512,)
    finally:
        sensor.close()


def test_osa_login_handshake():
    with OpticalBenchEmulators(shaper_port=0, osa_port=0, require_login=True, password="secret") as emu:
        sensor = OSASensor(emu.osa_resource, user="anonymous", password="secret", points=512,
                           start_m=770e-9, stop_m=780e-9)
        sensor.connect()
        try:
            assert sensor.identify().startswith("YOKOGAWA")
        finally:
            sensor.close()


def test_shared_light_path_block_and_transmit(emulators):
    with build_rig(optical_config(emulators)) as rig:
        shaper, osa = rig.actuators[0], rig.sensors[0]
        shaper.safe_state()
        dark, _ = osa.acquire()
        shaper.apply(np.ones(64, np.float32))
        bright, _ = osa.acquire()
        assert bright.max() > 1e-6  # ~3 uW peak at full transmission
        assert dark.max() < 1e-3 * bright.max()


def test_optical_rig_measures_a_batch(emulators):
    with build_rig(optical_config(emulators)) as rig:
        described = rig.describe()
        assert described["n_controls"] == 64 and described["n_outputs"] == 512
        assert set(described["instruments"]) == {"shaper", "osa"}
        controls = np.random.default_rng(1).random((6, 64), dtype=np.float32)
        measured = rig.measure(controls).raise_for_error()
        assert measured.traces.shape == (6, 512)
        # 0.01 dB attenuation steps: the controls applied differ from those sent, and say so
        assert np.abs(measured.applied - controls).max() < 0.01 / 10 + 1e-6
        assert (measured.flags & FLAG_QUANTISED).all()
        # a brighter mask gives a brighter second harmonic (SH goes as t^4)
        dim, bright = rig.run(np.stack([np.full(64, 0.2), np.full(64, 0.9)]).astype(np.float32))
        assert bright.sum() > 5 * dim.sum()


def test_osa_vanishing_mid_batch_returns_completed_rows(emulators):
    with build_rig(optical_config(emulators, timeout_s=1.0, sweep_timeout_s=1.0)) as rig:
        rig.run(np.full((1, 64), 0.5, np.float32))
        emulators.stop()  # the instruments go away
        measured = rig.measure(np.full((3, 64), 0.5, np.float32))
        assert measured.error is not None and measured.n_done == 0
        assert "shaper" in str(measured.error) or "osa" in str(measured.error)


@pytest.mark.slow
def test_end_to_end_through_device_server(emulators):
    from labpnn.remote.client import RigClient
    from labpnn.remote.server import DeviceServer

    with build_rig(optical_config(emulators)) as rig, \
            DeviceServer(rig, bind="tcp://127.0.0.1:*", publish="") as server, \
            RigClient(server.address) as client:
        assert client.describe()["axis"]["unit"] == "m"
        controls = np.random.default_rng(2).random((4, 64), dtype=np.float32)
        measured = client.measure(controls)
        assert measured.error is None and measured.traces.shape == (4, 512)
        assert np.isfinite(measured.traces).all() and measured.traces.max() > 0


@pytest.mark.slow
def test_sim_optical_command_prints_addresses_and_exits_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "labpnn.cli", "sim", "optical", "--shaper-port", "0", "--osa-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("waveshaper http://127.0.0.1:")
        assert lines[1].startswith("osa TCPIP::127.0.0.1::")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
