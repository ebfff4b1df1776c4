"""Anomaly filters per sensor: the rules (`rules`, no numba), the detector and its state
(`detector`), the kernels (`filters`) and their exact window sums (`drift`, `exact`)."""
