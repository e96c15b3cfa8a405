"""Metrics (metrics.py, system.py), JSON logs (logging.py), the access log (access.py) and the wiring of the
middleware stack (setup.py)."""
