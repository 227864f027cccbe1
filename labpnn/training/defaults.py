"""Training defaults derived from the data and the bench, each with a one-line reason.

`choose_defaults(describe, n_features=..., n_classes=..., n_train=..., overrides=...)` is a pure
function (no I/O, no torch, no physical pass) from the rig's ``describe()`` (``n_controls``,
``n_outputs``), the dataset's shape and size and the caller's explicit settings to every
training setting the caller left unset. Explicit settings always win (their reason says so).

The rules (C control channels, F features, K classes, N training rows):

- **features**: a physical layer takes at most ``0.6 C / MIN_REPEAT`` features (12 on 64 channels):
  the inputs on ~60 % of the C channels, the rest carrying trainable parameters, each feature on
  at least 3 channels (one copy per feature starves a many-class readout: digits on the twin,
  PCA to 38 features x 1 copy 41 %, 12 x 3 69 %). More features are reduced by PCA fitted on the
  training split (`labpnn.training.datasets.reduce_features`).
- **repeat** (control channels per feature): ``round(0.6 C / F)``, between 1 and ``MAX_REPEAT``
  — the inputs fill ~60 % of the band whatever F is (vowels: 12 features on 64 channels -> 3;
  4 features -> 8: with 3 copies, as before, a (4, 10) set reached 52 % on its own twin, 91 % with 8).
- **layout**: ``grouped`` (a feature's copies side by side) over the central 70 % of the band
  (``grouped:0.15-0.85``) with parameters interleaved and on the edges. On a spectral bench
  (SHG: a Gaussian pulse) the centre is where the light is; this span is the bench-independent
  default, not measured. When the span cannot hold the inputs they spread over the whole band.
- **readout bins**: one per class (a physical readout classifies by argmax of the pooled bins),
  placed ``balanced``: equal-mass on the mean trace of the training set through the twin, then,
  if some class would win (be the argmax) for under a third of its fair share of the training
  samples, re-placed until every class can win (`labpnn.training.network.Pooling.balanced`).
- **batch_size, lr, epochs**: Adam on batches of 16 at lr 0.05 whatever the size (larger batches
  at a scaled lr, 64 at 0.1, gave 86 % against 91 % on the (4, 10) set's twin: fewer steps), and
  about ``PASS_BUDGET`` (16,000) training passes: ``epochs = clip(round(16000 / N), 10, 60)``
  (vowels: 154 rows -> 60; 900 rows -> 18), i.e. ~1,000 steps; ``lr_schedule`` constant (a cosine
  decay measured no better there, 89 %).
- **calibration_rows**: ``60 C`` rounded up to 500 (64 channels -> 4,000): the twin's
  controls -> traces map has C inputs; ~60 rows per input fits the SHG bench's twin to a noise
  ratio ~2 (README: 1k/5k/20k rows -> 12.2/1.87/1.15).
- **twin_target** (noise ratio on the operating region, held-out rows near the controls the
  network sends; 1.0 is the noise floor) 1.5, **calibration_budget** 3x calibration_rows: the
  twin is refitted with more rows measured there until it reaches the target or the budget.
- **twin_seconds**: 120 s of fitting per round.
- **twin_core**: the generic ``residual_mlp``, unless the bench names a core that knows its physics
  (the acoustic bench: ``modulus``, magnitudes of a field linear in the tone amplitudes).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

INPUT_FRACTION = 0.6  #: at most this share of the control channels carries inputs
MAX_REPEAT = 8
SPAN = (0.15, 0.85)  #: the default input span (fraction of the band)
PASS_BUDGET = 16000  #: training passes per layer the epochs aim at
MIN_REPEAT = 3  #: each feature on at least this many channels (else fewer features, by PCA)
MIN_EPOCHS, MAX_EPOCHS = 10, 60
ROWS_PER_CONTROL = 60  #: calibration rows per control channel
TWIN_TARGET = 1.5
BUDGET_FACTOR = 3

#: the settings this module chooses (`TrainSettings` fields plus ``features``)
CHOSEN = ("features", "repeat", "layout", "pooling", "batch_size", "lr", "epochs", "lr_schedule",
          "calibration_rows", "calibration_budget", "twin_target", "twin_seconds", "twin_core")


@dataclass(frozen=True)
class Choice:
    """One setting: its value, why, and who chose it (``"rule"`` or ``"user"``)."""

    name: str
    value: Any
    reason: str
    source: str = "rule"

    def line(self) -> str:
        who = "" if self.source == "rule" else f" [{self.source}]"
        return f"{self.name} = {self.value!r}{who}: {self.reason}"


@dataclass(frozen=True)
class Defaults:
    """Every chosen setting, in `CHOSEN` order (JSON-able with `to_dict`)."""

    choices: tuple[Choice, ...]

    def __getitem__(self, name: str) -> Any:
        for c in self.choices:
            if c.name == name:
                return c.value
        raise KeyError(name)

    def values(self) -> dict[str, Any]:
        return {c.name: c.value for c in self.choices}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.choices}

    def lines(self) -> list[str]:
        return [c.line() for c in self.choices]


def max_features(n_controls: int) -> int:
    """The most input features one physical layer on ``n_controls`` channels takes (each on
    `MIN_REPEAT` channels, all on `INPUT_FRACTION` of them)."""
    return max(1, int(INPUT_FRACTION * n_controls / MIN_REPEAT))


def choose_defaults(describe: Mapping[str, Any], *, n_features: int, n_classes: int, n_train: int,
                    layers: int = 1, overrides: Mapping[str, Any] | None = None) -> Defaults:
    """The settings for a dataset of ``n_features`` x ``n_classes`` with ``n_train`` training rows
    on a system that ``describe``s itself (``n_controls``, ``n_outputs``). ``overrides``: the
    caller's explicit settings (None values count as unset)."""
    given = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    n_controls, n_outputs = int(describe["n_controls"]), int(describe["n_outputs"])
    if n_features < 1 or n_classes < 2 or n_train < 1:
        raise ValueError(f"need >= 1 feature, >= 2 classes and >= 1 training row, got {n_features}, "
                         f"{n_classes}, {n_train}")
    out: list[Choice] = []

    bench = {k: v for k, v in dict(describe.get("network") or {}).items() if v is not None}

    def pick(name: str, value: Any, reason: str) -> Any:
        if name in given:
            out.append(Choice(name, given[name], "given by the caller", "user"))
            return given[name]
        if name in bench:
            out.append(Choice(name, bench[name], "the bench's default (its config's [network] table)", "bench"))
            return bench[name]
        out.append(Choice(name, value, reason))
        return value

    # -- features and channels
    copies = given.get("repeat", bench.get("repeat"))
    if copies is not None:  # copies per feature given (caller or bench): reduce only what cannot fit at all
        fit = max(1, (n_controls - 1) // int(copies))
        why = f"{fit} = the {n_controls} channels less one parameter / {copies} copies (given)"
    else:
        fit = max_features(n_controls)
        why = f"{fit} = {INPUT_FRACTION:.0%} of {n_controls} channels / {MIN_REPEAT} copies each"
    if n_features > fit:
        feats = pick("features", fit, f"{n_features} features > {why}: PCA on the training split to {fit}")
    else:
        feats = pick("features", n_features, f"{n_features} features fit (at most {why}): used as they are")
    feats = int(feats)
    rep = max(1, min(MAX_REPEAT, round(INPUT_FRACTION * n_controls / feats)))
    repeat = int(pick("repeat", rep, f"round({INPUT_FRACTION} x {n_controls} channels / {feats} features) "
                      f"= {INPUT_FRACTION * n_controls / feats:.1f}, in [1, {MAX_REPEAT}]: {feats * rep} input "
                      f"channels, {n_controls - feats * rep} parameters"))
    n_inputs = feats * repeat
    span_holds = round(SPAN[1] * (n_controls - 1)) - round(SPAN[0] * (n_controls - 1)) + 1 >= n_inputs
    if span_holds:
        pick("layout", f"grouped:{SPAN[0]:g}-{SPAN[1]:g}",
             f"each feature's copies side by side on the central {SPAN[1] - SPAN[0]:.0%} of the band, parameters "
             "interleaved and on the edges (the default for a spectral bench, where the light is in the centre; "
             "not measured)")
    else:
        pick("layout", "grouped", f"{n_inputs} input channels do not fit the central {SPAN[1] - SPAN[0]:.0%} "
             f"of {n_controls}: spread over the whole band, copies side by side")
    # -- readout
    pick("pooling", "balanced", f"{n_classes} readout bins (one per class) of equal mass on the twin's mean "
         "trace, re-placed if some class would rarely be the argmax on the training set")
    # -- optimisation
    batch = int(pick("batch_size", 16, f"small batches, many steps, whatever the size: ~{math.ceil(n_train / 16)} "
                     f"steps per epoch of {n_train} rows"))
    lr = pick("lr", 0.05 if batch == 16 else round(0.05 * math.sqrt(batch / 16), 4),
              "Adam at 0.05 for batches of 16 (x sqrt(batch / 16) for other batches)")
    epochs = int(min(MAX_EPOCHS, max(MIN_EPOCHS, round(PASS_BUDGET / n_train))))
    epochs = int(pick("epochs", epochs, f"~{PASS_BUDGET} training passes / {n_train} rows, "
                      f"in [{MIN_EPOCHS}, {MAX_EPOCHS}]: ~{epochs * math.ceil(n_train / batch)} steps"))
    del lr
    pick("lr_schedule", "constant", "a constant rate (a cosine decay was no better on a (4, 10) set's twin)")
    # -- calibration and twin
    rows = int(math.ceil(ROWS_PER_CONTROL * n_controls / 500) * 500)
    rows = int(pick("calibration_rows", rows, f"{ROWS_PER_CONTROL} rows per control channel x {n_controls}, "
                    "rounded up to 500"))
    pick("calibration_budget", BUDGET_FACTOR * rows, f"{BUDGET_FACTOR}x the first sweep: the most rows "
         "measured to bring the twin to its target")
    pick("twin_target", TWIN_TARGET, "held-out noise ratio (MSE / repeat variance; 1.0 = the floor) on rows "
         "near the controls the network sends; above it, more rows there and a refit")
    pick("twin_seconds", 120.0, "fitting time per round")
    pick("twin_core", "residual_mlp", "a generic gated residual MLP (the bench's [network] table may name one that "
         "knows its physics, e.g. modulus for magnitudes of coherent fields)")
    del n_outputs  # described for completeness: bins are placed on the measured trace, not on a count
    return Defaults(tuple(out))
