"""HDF5 sessions: every batch a physical system runs, raw, crash-safe and readable while it grows.

Owns the file layout (`layout`: the datasets and attributes writer and reader share), the writer
(`writer`: `SessionWriter`, fed by a thread or a process through `engine`), the reader
(`reader`: `open_session`), the recording wrapper (`recording`: `RecordingSystem`, `record_to`),
replay (`replay`: `ReplayRig`) and the ``inspect`` / ``import`` commands (`cli`).

May import: ``labpnn.contract``, ``labpnn.protocols``, ``labpnn.drivers.roles``; never the rig, the
network side, the twin or training (and never torch: the device server records with this).
"""
from labpnn.sessions.layout import (
    BATCH_FIELDS,
    FORMAT,
    PER_ROW,
    TAG_VOCABULARY,
    SessionFormatError,
    SessionWriteError,
    provenance,
    segment_path,
)
from labpnn.sessions.reader import Batch, Segment, SessionReader, open_session
from labpnn.sessions.recording import RecordingSystem, record_to
from labpnn.sessions.replay import NotRecorded, ReplayRig
from labpnn.sessions.writer import SessionWriter

__all__ = [
    "BATCH_FIELDS", "FORMAT", "PER_ROW", "TAG_VOCABULARY", "Batch", "NotRecorded", "RecordingSystem",
    "ReplayRig", "Segment", "SessionFormatError", "SessionReader", "SessionWriteError", "SessionWriter",
    "open_session", "provenance", "record_to", "segment_path",
]
