"""Prefect flows orchestrating the medsynth library (one per stage, plus the full pipeline).

Importing this package sets Prefect defaults suited to an offline, possibly loaded machine (no
telemetry; a generous start-up timeout for the temporary local API server). Explicit environment
settings win.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
