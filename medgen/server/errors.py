class FederationError(RuntimeError):
    """The federation cannot go on (too few sites answered, sites missing, a bad run directory, ...)."""


class StudyRefused(FederationError):
    """Too few training sites serve the study, and every one missing refused it by its own policy
    (exit code 5, like a site's own refusal); the text names each site's refusal."""
