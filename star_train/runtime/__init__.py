"""The runtime layer: what every stage runs on. ``config`` (TOML run configs), ``models``
(loading, precision, the next-token rows), ``run_folder`` (config record, settings pins,
atomic writes), ``checkpoint``, ``schedule`` (which data each step sees), ``generation``
(seeded sampling) and ``trainer`` (the one training skeleton). Imports no stage."""
