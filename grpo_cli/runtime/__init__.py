"""The process a run lives in: torchrun ranks and collectives, the global RNG state, log setup."""
