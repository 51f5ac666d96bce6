"""The one exception users see: a clear, single-line message that names the problem."""


class FirpError(Exception):
    """Bad input or an unsupported request; the CLI prints it as one line and exits 2."""
