"""Policies choose an arm (drafter, draft length k) and learn from round records.

This package depends on nothing else of draftpick's: `workers` and `controller`
import its types.
"""
from policies.types import Arm, RoundRecord

__all__ = ["Arm", "RoundRecord"]
