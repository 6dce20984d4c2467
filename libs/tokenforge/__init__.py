"""tokenforge: an OpenAI-compatible gateway whose every request's money is explainable."""

__version__ = "0.1.0"
