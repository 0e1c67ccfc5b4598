"""Adapters that let other tools drive a moca model (``moca.integrations.mteb``)."""
