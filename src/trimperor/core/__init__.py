"""The pure core (layer 0): what trimperor decides, with no I/O and no clock.

Configuration parsing, vassal specs, the lifecycle table and the vassal
machine, backoff policy, reconciliation, placement, stats snapshots and the
uWSGI protocol's bytes. Time is an argument; nothing here imports trio, opens a
file or reads the clock (``tests/test_layering.py`` keeps it so).
"""
