"""Model-family adapters: the only code in vtprune that knows model internals (one file per family)."""
