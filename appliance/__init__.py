"""The appliance: a self-hosted LLM inference appliance."""

__version__ = "0.1.0"
