"""darkmatter: measure, decompose and explain the dark matter of sparse autoencoders."""

__version__ = "0.1.0"
