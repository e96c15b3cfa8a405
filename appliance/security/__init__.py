"""API keys and their roles (keys.py, keys_cli.py, roles.py), bearer authentication (auth.py), per-key
limits (limits.py) and usage accounting (usage.py).

The middleware that uses them is assembled by the composition root, appliance/app.py.
"""
