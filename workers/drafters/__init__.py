"""Drafters: propose tokens, stay in sync with what was verified (see base.py)."""
