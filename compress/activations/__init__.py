"""Activation-threshold sparsity (TEAL, CHESS, WINA): calibrate per-linear input thresholds from streaming
histograms, apply them at inference by zeroing the inputs below them.

Every method ends as one ``(in,)`` tensor of thresholds per targeted linear: channel ``j`` of the input is
zeroed where ``|x_j| < t_j``. TEAL: ``t_j = T`` for all ``j``; WINA: ``t_j = T / ‖W[:, j]‖₂`` (the score
``|x_j|·‖W[:, j]‖₂`` against one threshold); CHESS: on a gated MLP's down projection ``t_j = T / E|up_j|``
applied to the gate activation ``x / up``, one ``T`` on every other input. ``T`` (or the ``t_j``) are set so the
target fraction of calibration inputs is zeroed.
"""
