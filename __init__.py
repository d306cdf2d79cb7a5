"""draftpick: online draft selection for lossless speculative decoding.

The repository's top-level folders are this package's subpackages (see the README's layout):
`draftpick.workers` (engine, drafters, Ray worker), `draftpick.policies` (the policy protocol and
built-ins), `draftpick.controller` (decisions, learning, offline replay), `draftpick.training`
(drafter distillation), `draftpick.bench` (benchmarks) and `draftpick.deploy` (the CLI).
"""
__version__ = "0.1.0"
