"""Policies choose an arm (drafter, draft length k) and learn from round records.

The stable public surface for plug-ins is what this module exports:

    from draftpick.policies import Arm, Choice, Context, RoundRecord, Policy

This package depends on nothing else of draftpick's: `workers` and `controller` import its types.
"""
from draftpick.policies.base import Policy, Stats
from draftpick.policies.types import Arm, Choice, Context, RoundRecord

__all__ = ["Arm", "Choice", "Context", "RoundRecord", "Policy", "Stats"]
