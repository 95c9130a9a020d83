"""The one exception type the CLI turns into a one-line message and exit code 2."""


class LtcacheError(Exception):
    """A user-facing error: bad input, a missing file, a name that is not registered.

    The message must say what is wrong and how to fix it, on one line.
    """


def unknown_name(kind: str, name: str, known) -> LtcacheError:
    """An error for a name missing from a registry, listing the valid names."""
    return LtcacheError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")
