"""What users see when something is wrong or degraded: one clear line that names it."""


class FirpError(Exception):
    """Bad input or an unsupported request; the CLI prints it as one line and exits 2."""


class FirpWarning(UserWarning):
    """A run that works, but not as asked (e.g. ops a backend runs with the torch reference);
    the CLI prints it as one line."""
