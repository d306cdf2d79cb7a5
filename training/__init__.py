"""Training drafters from the target: distillation (`distill`) and its data sets (`datasets`).

Nothing here runs at serving time; `draftpick distill` is the entry point.
"""
