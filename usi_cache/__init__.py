"""usi-cache: teacher-logit caching for offline knowledge distillation (USI recipe)."""
__version__ = "0.1.0"
