"""megalite: readable long-sequence transformer pretraining."""

__version__ = "0.1.0"
