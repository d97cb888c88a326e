"""The project's exception types: each message states the rule, the value seen and the fix."""


class SSAMBAError(Exception):
    """Base class of every error a user can trigger (bad input, bad config, bad files)."""


class ConfigError(SSAMBAError, ValueError):
    """A configuration value or override is invalid."""


class AudioError(SSAMBAError):
    """An audio file cannot be used: missing, unreadable, empty or containing non-finite samples.

    ``path`` names the file; ``reason`` is a short machine-friendly kind (``missing``, ``unreadable``,
    ``empty``, ``non_finite``, ...).
    """

    def __init__(self, path, reason: str, message: str):
        self.path = str(path)
        self.reason = reason
        self.message = message
        super().__init__(f"{path}: {message}")

    def __reduce__(self):  # picklable, so that Ray carries it (path included) back to the driver
        return (self.__class__, (self.path, self.reason, self.message))


class KernelBuildError(SSAMBAError, RuntimeError):
    """A CUDA kernel cannot be built, loaded or checked; the message says why and what to do."""


class ManifestError(SSAMBAError, ValueError):
    """A manifest (or a dataset layout being imported) violates the schema."""
