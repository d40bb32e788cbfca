"""surgery: checkpoint surgery that turns dense LLM checkpoints into Mixture-of-Experts ones.

Importing the package is cheap: torch and transformers are imported only by the modules that
compute or validate, never by the CLI entry point itself.
"""

__version__ = "0.1.0"
