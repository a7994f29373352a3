"""Evaluation: BFCL v3 offline (``bfcl``) and the ``star-train eval`` command (``command``)."""
