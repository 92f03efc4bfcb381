"""rlsedit: lifelong knowledge editing of LLMs with the exact recursive least-squares editor."""

__version__ = "0.1.0"
