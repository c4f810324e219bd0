"""The one base class of fflora's own failures, so the CLI can report them in one clear line."""


class FFloraError(RuntimeError):
    """A failure with a message that names the problem and the fix."""
