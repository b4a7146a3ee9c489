"""procure: an autonomous agent that rents GPU compute for a goal within a hard budget."""

__version__ = "0.1.0"
