"""The package version (read by setup.cfg and re-exported as ``cachedata.__version__``)."""

__version__ = "0.2.0"
