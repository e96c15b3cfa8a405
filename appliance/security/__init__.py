"""API keys (keys.py, keys_cli.py), bearer authentication (auth.py) and per-key limits (limits.py).

The middleware stack that uses them is assembled in appliance/observability/setup.py.
"""
