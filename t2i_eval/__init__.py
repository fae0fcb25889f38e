"""t2i-eval: measure over-refusal in text-to-image systems, stage by stage."""

__version__ = "0.1.0"
