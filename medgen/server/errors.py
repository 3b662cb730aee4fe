class FederationError(RuntimeError):
    """The federation cannot go on (too few sites answered, sites missing, a bad run directory, ...)."""
