"""The digital twin: a torch model of ``controls -> traces`` fitted from measurements.

Owns the model and its checkpoints (`model`), fitting and its metrics (`fit`, `metrics`), online
refinement (`online`: the twin's quality, and its adaptation when the physics drifts; drift
itself is told by `labpnn.training.drift`'s probes), calibration sweeps (`calibrate`, numpy only), a twin
served as a (labelled) rig (`served`) and the ``calibrate`` / ``twin`` commands (`cli`).

May import: ``labpnn.contract``, ``labpnn.sessions``, ``labpnn.config`` and ``labpnn.remote`` (the
commands reach a rig through them); never ``labpnn.training`` or ``labpnn.benches``, never
``labpnn.sim_instruments`` (a simulated bench is fitted exactly like a real one). Names below are
imported on first use, so ``labpnn.twin.calibrate`` works without torch.
"""
from labpnn import lazy_exports

EXPORTS = {
    **dict.fromkeys(("FORMAT", "ControlFeatures", "GatedBlock", "ModulusMLP", "ResidualMLP", "Twin", "jsonable", "load_twin",
                     "save_twin"), "labpnn.twin.model"),
    **dict.fromkeys(("FIT_TAGS", "NOISE_TAG", "FitReport", "SessionData", "TwinDataRefused", "fit_twin", "fit_twin_from_data",
                     "fit_twin_from_sessions", "load_sessions", "split_by_time", "train_twin"), "labpnn.twin.fit"),
    **dict.fromkeys(("control_groups", "expected_noise_var", "fit_noise_model", "noise_from_repeats",
                     "noise_variance", "regression_metrics"), "labpnn.twin.metrics"),
    **dict.fromkeys(("DriftAlarm", "OnlineTwinFitter"), "labpnn.twin.online"),
    **dict.fromkeys(("calibrate", "near_sampler", "plan_calibration", "uniform_sampler"), "labpnn.twin.calibrate"),
    **dict.fromkeys(("TwinSystem", "is_twin_describe"), "labpnn.twin.served"),
}
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
__all__ = sorted(EXPORTS)
