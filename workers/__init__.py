"""Ray worker actors, the speculative engine and its drafters."""
