"""firp-engine: a small LLaMA-family inference runtime with FIRP speculative decoding."""

from firp_engine.errors import FirpError

__all__ = ["FirpError", "LLM"]


def __getattr__(name: str):
    # Lazy so that `import firp_engine` stays cheap (the CLI parses args before loading torch).
    if name == "LLM":
        from firp_engine.generate import LLM

        return LLM
    raise AttributeError(name)
