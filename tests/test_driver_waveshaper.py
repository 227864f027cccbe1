"""WaveShaper driver: WSP codec, client-side validation, REST transcripts, the actuator mapping.

The HTTP exchanges are written from the WaveShaper REST API description (FIELD-NOTES), never from
the emulator.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest
from driver_transcripts import HttpStep, HttpTranscript, free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from labpnn.drivers import roles
from labpnn.drivers.waveshaper import (
    InvalidAttenuationError,
    InvalidFrequencyError,
    InvalidSpacingError,
    NarrowBandwidthError,
    ShaperActuator,
    WaveShaperClient,
    WaveShaperConnectionError,
    WaveShaperError,
    WaveShaperProfileError,
    format_wsp,
    parse_wsp,
    validate_profile,
)

DEVINFO = {"model": "WS-01000A", "sno": "SN201234", "ver": "2.1.5", "startfreq": 191.25,
           "stopfreq": 191.4, "ip": "127.0.0.1", "portcount": 1, "rctext": "OK"}
OK = {"rc": 0, "rctext": "OK", "sno": "SN201234"}


def devinfo_step(info=None) -> HttpStep:
    return HttpStep("GET", "/waveshaper/devinfo", reply=info or DEVINFO)


# -- codec -----------------------------------------------------------------------------------------
def test_format_wsp_exact_text():
    text = format_wsp([191.25, 191.251, 191.252], [0, 12.345, 60], [0, 1.5, -0.25], [1, 1, 0])
    assert text == ("191.250\t0.000\t0.000\t1\n"
                    "191.251\t12.345\t1.500\t1\n"
                    "191.252\t60.000\t-0.250\t0\n")


def test_format_wsp_broadcasts_scalars_and_prints_no_negative_zero():
    assert format_wsp([193.0, 193.001], -0.0) == "193.000\t0.000\t0.000\t1\n193.001\t0.000\t0.000\t1\n"
    assert format_wsp([], 0.0) == ""


def test_parse_wsp_skips_blanks_and_comments_and_reads_crlf():
    p = parse_wsp("; profile\r\n191.250\t1.5\t0.1\t1\r\n\r\n# note\n191.251 2 0 0\n")
    assert p.freq_thz.tolist() == [191.25, 191.251]
    assert p.attn_db.tolist() == [1.5, 2.0]
    assert p.phase_rad.tolist() == [0.1, 0.0]
    assert p.port.tolist() == [1, 0]
    assert p.port.dtype == np.int64


@pytest.mark.parametrize("line", ["191.250\t1.0\t0.0", "191.250\tx\t0.0\t1", "191.250\t1\t0\t1.5"])
def test_parse_wsp_names_the_bad_line(line):
    with pytest.raises(WaveShaperProfileError, match="line 2"):
        parse_wsp("191.249\t0\t0\t1\n" + line + "\n")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60_000), st.integers(-6283, 6283), st.integers(0, 4)),
                min_size=1, max_size=30),
       st.integers(191_000, 196_000))
def test_wsp_round_trip(rows, first_ghz):
    freq = (first_ghz + np.arange(len(rows))) / 1000
    attn = np.array([r[0] for r in rows]) / 1000
    phase = np.array([r[1] for r in rows]) / 1000
    port = np.array([r[2] for r in rows])
    text = format_wsp(freq, attn, phase, port)
    p = parse_wsp(text)
    np.testing.assert_allclose(p.freq_thz, freq, atol=1e-9)
    np.testing.assert_allclose(p.attn_db, attn, atol=1e-9)
    np.testing.assert_allclose(p.phase_rad, phase, atol=1e-9)
    assert p.port.tolist() == port.tolist()
    assert format_wsp(*p) == text


# -- client-side validation ------------------------------------------------------------------------
def band(start_ghz: int, n: int) -> np.ndarray:
    return (start_ghz + np.arange(n)) / 1000


@pytest.mark.parametrize(
    ("kwargs", "error", "rc", "match"),
    [
        ({"freq_thz": [191.3, 191.3005]}, InvalidSpacingError, -33, "grid"),
        ({"freq_thz": [191.3, 191.302, 191.301]}, InvalidFrequencyError, -30, "increasing"),
        ({"freq_thz": [191.3, 191.3]}, InvalidFrequencyError, -30, "increasing"),
        ({"freq_thz": [191.249, 191.26]}, InvalidFrequencyError, -30, "start frequency"),
        ({"freq_thz": [191.3, 191.401]}, InvalidFrequencyError, -30, "stop frequency"),
        ({"attn_db": [0.0, np.nan]}, InvalidAttenuationError, -31, "0..60"),
        ({"attn_db": [60.01, 0.0]}, InvalidAttenuationError, -31, "0..60"),
        ({"attn_db": [-0.5, 0.0]}, InvalidAttenuationError, -31, "0..60"),
        ({"phase_rad": [0.0, np.inf]}, WaveShaperProfileError, None, "phase"),
        ({"port": [1, 2]}, WaveShaperProfileError, None, "outside 0..1"),
    ],
)
def test_validate_profile_refuses(kwargs, error, rc, match):
    args = {"freq_thz": [191.3, 191.31], "attn_db": 0.0, "phase_rad": 0.0, "port": 0} | kwargs
    with pytest.raises(error, match=match) as info:
        validate_profile(**args, startfreq=191.25, stopfreq=191.4, portcount=1)
    assert info.value.rc == rc and info.value.client_side
    assert isinstance(info.value, ValueError) and isinstance(info.value, roles.InstrumentError)


def test_validate_profile_band_width_rule():
    ports = np.r_[np.zeros(5, int), np.ones(11, int), np.zeros(5, int)]
    validate_profile(band(191_300, 21), 0.0, 0.0, ports)  # 11 points span 0.010 THz: fine
    ports = np.r_[np.zeros(5, int), np.ones(10, int), np.zeros(6, int)]
    with pytest.raises(NarrowBandwidthError, match="191.305..191.314") as info:
        validate_profile(band(191_300, 21), 0.0, 0.0, ports)
    assert info.value.rc == -34
    validate_profile(band(191_300, 3), 60.0, 0.0, 0)  # blocked lines may be as narrow as they like


# -- client over HTTP ------------------------------------------------------------------------------
def test_client_devinfo_getprofile_load_block_transmit():
    text = "191.250\t60.000\t0.000\t0\n191.251\t3.000\t0.500\t1\n"
    freq = band(191_300, 11)
    expected_wsp = format_wsp(freq, 2.5, 0.0, 1)
    steps = [
        devinfo_step(),
        HttpStep("GET", "/waveshaper/getprofile", reply=text),
        HttpStep("POST", "/waveshaper/loadprofile", {"type": "wsp", "wsp": expected_wsp, "port": 1}, OK),
        HttpStep("POST", "/waveshaper/loadprofile", {"type": "blockall"}, OK),
        HttpStep("POST", "/waveshaper/loadprofile", {"type": "transmit", "port": 1}, OK),
    ]
    with HttpTranscript(steps) as srv:
        client = WaveShaperClient(srv.url, timeout=2)
        info = client.devinfo()
        assert (info["model"], info["startfreq"], info["stopfreq"], info["portcount"]) == \
            ("WS-01000A", 191.25, 191.4, 1)
        profile = client.get_profile()
        assert profile.attn_db.tolist() == [60.0, 3.0] and profile.port.tolist() == [0, 1]
        assert client.load_profile(freq, 2.5, 0.0, 1) == OK  # devinfo cached: no second GET
        client.block_all()
        client.transmit()
        client.close()
    srv.verify()


def test_client_accepts_a_bare_host_and_json_wrapped_profile():
    steps = [HttpStep("GET", "/waveshaper/getprofile", reply={"rc": 0, "wsp": "191.300\t1\t0\t1\n"})]
    with HttpTranscript(steps) as srv:
        client = WaveShaperClient(srv.url.removeprefix("http://") + "/", timeout=2)
        assert client.url == srv.url
        assert client.get_profile().attn_db.tolist() == [1.0]
    srv.verify()


def test_client_refuses_bad_profile_before_uploading():
    with HttpTranscript([devinfo_step()]) as srv:
        client = WaveShaperClient(srv.url, timeout=2)
        with pytest.raises(InvalidFrequencyError, match="stop frequency"):
            client.load_profile(band(191_395, 11), 0.0, 0.0, 1)
        with pytest.raises(NarrowBandwidthError):
            client.load_profile(band(191_300, 5), 0.0, 0.0, 1)
    srv.verify()  # only the devinfo GET reached the shaper


@pytest.mark.parametrize(
    ("rc", "error"),
    [(-30, InvalidFrequencyError), (-31, InvalidAttenuationError), (-33, InvalidSpacingError),
     (-34, NarrowBandwidthError), (-2, WaveShaperError)],
)
def test_vendor_rc_becomes_exception(rc, error):
    reply = {"rc": rc, "rctext": f"vendor text {rc}", "sno": "SN201234"}
    steps = [HttpStep("POST", "/waveshaper/loadprofile", {"type": "wsp", "wsp": "x\n", "port": 1}, reply)]
    with HttpTranscript(steps) as srv:
        client = WaveShaperClient(srv.url, timeout=2)
        with pytest.raises(error) as info:
            client.load_wsp("x\n")
    srv.verify()
    exc = info.value
    assert type(exc) is error
    assert (exc.rc, exc.rctext, exc.url, exc.client_side) == (rc, f"vendor text {rc}", srv.url, False)
    assert f"rc={rc}" in str(exc) and srv.url in str(exc)
    assert isinstance(exc, roles.InstrumentError)


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (HttpStep("POST", "/waveshaper/loadprofile", {"type": "blockall"}, "busy", status=503), "HTTP 503"),
        (HttpStep("POST", "/waveshaper/loadprofile", {"type": "blockall"}, "<html>"), "not a JSON object"),
        (HttpStep("POST", "/waveshaper/loadprofile", {"type": "blockall"}, {"rc": "0"}), "bad rc"),
    ],
)
def test_bad_replies_become_waveshaper_errors(step, match):
    with HttpTranscript([step]) as srv, pytest.raises(WaveShaperError, match=match):
        WaveShaperClient(srv.url, timeout=2).block_all()
    srv.verify()


def test_devinfo_without_frequencies_is_an_error():
    with HttpTranscript([devinfo_step({"model": "WS", "sno": "1", "ver": "1"})]) as srv, \
            pytest.raises(WaveShaperError, match="startfreq"):
        WaveShaperClient(srv.url, timeout=2).devinfo()
    srv.verify()


def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(WaveShaperConnectionError, match="connection refused") as info:
        WaveShaperClient(url, timeout=2).devinfo()
    assert url in str(info.value) and isinstance(info.value, roles.InstrumentError)


def test_silent_shaper_times_out_clearly():
    with socket.socket() as listener:  # accepts the TCP connection (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(WaveShaperConnectionError, match=r"did not answer POST /waveshaper/loadprofile within 0.2 s"):
            WaveShaperClient(url, timeout=0.2).block_all()


def test_client_constructor_validates():
    with pytest.raises(ValueError, match="url"):
        WaveShaperClient("")
    with pytest.raises(ValueError, match="timeout"):
        WaveShaperClient("127.0.0.1", timeout=0)


# -- the actuator ----------------------------------------------------------------------------------
# devinfo grid: 191.250 .. 191.400 THz (151 points); band 191.300 .. 191.340 THz, 4 channels.
GRID = band(191_250, 151)
EDGES = [191.30, 191.31, 191.32, 191.33, 191.34]


def channel_of(freq: np.ndarray) -> np.ndarray:
    ghz = np.rint(freq * 1000).astype(int)
    chan = np.full(freq.size, -1)
    for c in range(4):
        chan[(ghz >= 191_300 + 10 * c) & (ghz < 191_310 + 10 * c)] = c
    chan[ghz == 191_340] = 3  # the last edge belongs to the last channel
    return chan


def expected_text(attn_per_channel) -> str:
    chan = channel_of(GRID)
    attn = np.where(chan >= 0, np.asarray(attn_per_channel, float)[chan], 60.0)
    return format_wsp(GRID, attn, 0.0, np.where(chan >= 0, 1, 0))


def make_actuator(url: str, **kwargs) -> ShaperActuator:
    return ShaperActuator(WaveShaperClient(url, timeout=2), 4, 191.30, 191.34, **kwargs)


def test_actuator_maps_controls_to_profile_and_quantises():
    steps = [
        devinfo_step(),
        HttpStep("POST", "/waveshaper/loadprofile",
                 {"type": "wsp", "wsp": expected_text([0.0, 15.0, 30.0, 26.3]), "port": 1}, OK),
        HttpStep("POST", "/waveshaper/loadprofile", {"type": "blockall"}, OK),
    ]
    with HttpTranscript(steps) as srv:
        shaper = make_actuator(srv.url)
        assert isinstance(shaper, roles.Actuator)
        shaper.connect()
        assert shaper.identify() == "WS-01000A SN201234 2.1.5"
        row = np.array([1.0, 0.5, 0.0, 0.1234], np.float32)  # 0.1234 -> 26.298 dB -> 26.30 dB
        applied = shaper.apply(row)
        assert applied.dtype == np.float32
        np.testing.assert_array_equal(applied[:3], row[:3])  # exact on the 0.01 dB grid
        assert applied[3] == np.float32((30 - 26.30) / 30) != row[3]
        shaper.safe_state()
    srv.verify()


def test_actuator_blocks_outside_the_band_with_port_0_and_60_db():
    with HttpTranscript([devinfo_step()]) as srv:
        shaper = make_actuator(srv.url)
        shaper.connect()
        text, _ = shaper.profile(np.full(4, 0.5, np.float32))
    srv.verify()
    p = parse_wsp(text)
    np.testing.assert_allclose(p.freq_thz, GRID)
    chan = channel_of(GRID)
    assert (p.port[chan < 0] == 0).all() and (p.attn_db[chan < 0] == 60).all()
    assert (p.port[chan >= 0] == 1).all() and (p.attn_db[chan >= 0] == 15).all()
    assert [int((chan == c).sum()) for c in range(4)] == [10, 10, 10, 11]
    assert text == expected_text([15.0] * 4)


def test_actuator_explicit_edges_and_attenuation_range():
    with HttpTranscript([devinfo_step()]) as srv:
        shaper = ShaperActuator(WaveShaperClient(srv.url, timeout=2), 2, edges_thz=[191.30, 191.305, 191.34],
                                attn_min_db=5.0, attn_max_db=25.0, attn_resolution_db=0.5)
        shaper.connect()
        text, applied = shaper.profile(np.array([0.0, 0.26], np.float32))  # 25 dB, 19.8 -> 20.0 dB
    srv.verify()
    p = parse_wsp(text)
    assert p.attn_db[(p.freq_thz > 191.2995) & (p.freq_thz < 191.3045)].tolist() == [25.0] * 5
    assert set(p.attn_db[(p.freq_thz > 191.3045) & (p.freq_thz < 191.3405)].tolist()) == {20.0}
    assert applied.tolist() == [0.0, np.float32(0.25)]


def test_actuator_fast_template_matches_the_codec_on_a_full_c_band():
    info = DEVINFO | {"startfreq": 191.25, "stopfreq": 196.275, "portcount": 4}
    with HttpTranscript([devinfo_step(info)]) as srv:
        shaper = ShaperActuator(WaveShaperClient(srv.url, timeout=2), 64, 192.0, 196.0, port=2)
        shaper.connect()
    srv.verify()
    rng = np.random.default_rng(0)
    row = rng.random(64).astype(np.float32)
    text, applied = shaper.profile(row)
    grid = shaper.grid()
    edges_ghz = np.linspace(192_000, 196_000, 65)
    ghz = np.rint(grid.freq_thz * 1000)
    chan = np.clip(np.searchsorted(edges_ghz, ghz, side="right") - 1, 0, 63)
    inband = (ghz >= 192_000) & (ghz <= 196_000)
    attn = np.where(inband, shaper.attenuation_db(row)[chan], 60.0)
    assert text == format_wsp(grid.freq_thz, attn, 0.0, np.where(inband, 2, 0))
    validate_profile(*parse_wsp(text), startfreq=191.25, stopfreq=196.275, portcount=4)
    np.testing.assert_allclose(applied, row, atol=0.01 / 30 / 2 + 1e-7)


def test_actuator_refuses_layouts_the_shaper_cannot_take():
    with HttpTranscript([devinfo_step(), devinfo_step(), devinfo_step()]) as srv:
        client = WaveShaperClient(srv.url, timeout=2)
        with pytest.raises(InvalidFrequencyError, match="not inside"):
            ShaperActuator(client, 4, 191.30, 191.45).connect()
        with pytest.raises(ValueError, match="channel 1 .* holds no 0.001 THz grid point"):
            ShaperActuator(client, 40, 191.30, 191.32).connect()
        with pytest.raises(NarrowBandwidthError):
            ShaperActuator(client, 1, 191.30, 191.305).connect()
    srv.verify()


def test_apply_before_connect_is_a_clear_error():
    shaper = ShaperActuator(WaveShaperClient(f"127.0.0.1:{free_port()}"), 4, 191.30, 191.34)
    with pytest.raises(WaveShaperError, match="connect"):
        shaper.apply(np.zeros(4, np.float32))


def test_check_rejects_malformed_batches():
    shaper = ShaperActuator("127.0.0.1:1", 4, 191.30, 191.34)
    shaper.check(np.zeros((3, 4), np.float32))
    for batch, match in [(np.zeros((2, 3), np.float32), r"shape \(B, 4\)"),
                         (np.array([[0, 0, 1.5, 0]], np.float32), "row 0, channel 2"),
                         (np.array([[0, 0, 0, 0], [np.nan, 0, 0, 0]], np.float32), "row 1, channel 0")]:
        with pytest.raises(ValueError, match=match):
            shaper.check(batch)


def test_check_enforces_attenuation_floor_and_total_transmission():
    shaper = ShaperActuator("127.0.0.1:1", 4, 191.30, 191.34, min_attn_db=10.0)
    shaper.check(np.full((1, 4), 2 / 3, np.float32))  # exactly 10 dB
    with pytest.raises(ValueError, match=r"row 1, channel 3: .* below the floor min_attn_db=10 dB"):
        shaper.check(np.array([[0, 0, 0, 0], [0, 0, 0, 0.7]], np.float32))
    shaper.configure(min_attn_db=[0, 0, 0, 20.0])
    shaper.check(np.array([[1, 1, 1, 1 / 3]], np.float32))
    with pytest.raises(ValueError, match="channel 3"):
        shaper.check(np.array([[1, 1, 1, 0.5]], np.float32))
    shaper.configure(min_attn_db=None, max_total_transmission=0.51)
    shaper.check(np.array([[1, 1, 0, 0]], np.float32))  # 2 of 4 equal channels at 0 dB, 2 at 30 dB: 0.5005
    with pytest.raises(ValueError, match=r"row 0: total transmission 0.75\d* exceeds max_total_transmission=0.51"):
        shaper.check(np.array([[1, 1, 1, 0]], np.float32))


def test_apply_enforces_the_limits_too():
    with HttpTranscript([devinfo_step()]) as srv:
        shaper = make_actuator(srv.url, min_attn_db=10.0)
        shaper.connect()
        with pytest.raises(ValueError, match="floor"):
            shaper.apply(np.ones(4, np.float32))
    srv.verify()  # nothing uploaded


def test_settings_and_configure():
    shaper = ShaperActuator("127.0.0.1:1", 4, 191.30, 191.34, settle_s=0.02)
    s = shaper.settings()
    assert s["settle_s"] == shaper.settle_s == 0.02
    assert (s["attn_min_db"], s["attn_max_db"], s["attn_resolution_db"]) == (0.0, 30.0, 0.01)
    assert s["edges_thz"] == pytest.approx(EDGES) and s["blocked_outside_band"] == {"attn_db": 60.0, "port": 0}
    shaper.configure(attn_max_db=40, settle_s=0.1)
    assert (shaper.attn_max_db, shaper.settle_s) == (40.0, 0.1)
    bad = [({"attn_max_db": 61}, "attn_max_db"), ({"attn_min_db": 45}, "attn_max_db: must be above"),
           ({"settle_s": -1}, "settle_s"), ({"settle_s": True}, "settle_s"),
           ({"attn_resolution_db": 0}, "attn_resolution_db"), ({"attn_max_db": 30.005}, "multiple"),
           ({"min_attn_db": [1, 2]}, "min_attn_db"), ({"max_total_transmission": 2}, "max_total_transmission"),
           ({"colour": "red"}, "unknown setting 'colour'")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            shaper.configure(**kwargs)
    assert (shaper.attn_max_db, shaper.settle_s) == (40.0, 0.1)  # nothing changed
