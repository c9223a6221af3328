"""The columns training adds to its reference snapshot for the monitor.

Training stores a PHI-free snapshot of its rows with each run (``clinml.training.train``:
``REFERENCE_FILE``, read back by ``load_reference``); the monitor compares live traffic
with it (``clinml.monitoring.drift``). Beside the features, the snapshot carries these two
columns, so the monitor can cluster its tests by patient and choose a seasonal reference
without any identifier or date. They are defined here, in the layer that writes them, so
that training never imports monitoring.
"""

CLUSTER_COLUMN = "_cluster"  # the reference's patient, as an arbitrary integer
WEEK_COLUMN = "_week"  # the reference row's ISO week of the year (no year, no day)
