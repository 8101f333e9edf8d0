"""usi-cache: teacher-logit caching for offline knowledge distillation (USI recipe)."""
__version__ = "0.1.0"


def open_cache(path, shards=None):
    """Open a cache read-only for a notebook (usi_cache.api.Cache): per-view top-k, rendered
    views, a per-sample table. Imported on call, so that `import usi_cache` stays light."""
    from usi_cache.api import open_cache as _open
    return _open(path, shards)
