"""ltcache: decoupled long-tailed recognition over a cached feature store."""

__version__ = "0.1.0"
