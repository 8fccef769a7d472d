"""The project's own error type: anything the user can fix gets one of these."""


def first_line(error: BaseException | None) -> str:
    """An exception as one short line, for messages that quote what a library said."""
    text = str(error or "").strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:300].rsplit(" ", 1)[0] + " …"  # whole words


class KeyframesError(Exception):
    """A problem with the user's input or environment, reported as one message and exit code 2.
    The message lists the first MAX_LISTED problems and counts the rest: a file with 100,000
    bad entries gets a message a person reads, not a megabyte."""

    MAX_LISTED = 20

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    @classmethod
    def listing(cls, heading: str, problems: list[str]):
        """One problem as the message itself; several under the heading."""
        return cls(problems[0]) if len(problems) == 1 else cls(heading, problems)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        listed = [f"  {p}" for p in self.problems[: self.MAX_LISTED]]
        if len(self.problems) > self.MAX_LISTED:
            listed.append(f"  ... and {len(self.problems) - self.MAX_LISTED} more")
        return head + "\n" + "\n".join(listed)


class ShotlistError(KeyframesError):
    """The shotlist file is missing, unreadable or does not follow the format."""


class ConfigError(KeyframesError):
    """A config value is out of range or inconsistent."""


class FolderInUse(KeyframesError):
    """Another run holds the run folder; nothing of it may be touched."""


class ModelUnavailableError(KeyframesError):
    """Weights could not be found locally or downloaded."""


class TrackingError(KeyframesError):
    """The tracking store cannot be read or holds no such experiment or run."""


class DiskFull(Exception):
    """No space left where the run writes; the run directory keeps what was finished."""

    def __init__(self, result, path: str, needed_bytes: int, left: int):
        super().__init__(f"no space left on the device of {path}")
        self.result = result  # the RenderResult as far as it got
        self.path = path  # the file that could not be written
        self.needed_bytes = needed_bytes  # an estimate for the images still to make
        self.left = left  # images still to make


def is_disk_full(error: BaseException) -> bool:
    import errno

    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run directory holds everything finished before it."""

    def __init__(self, result, while_tracking: bool = False):
        super().__init__("interrupted")
        self.result = result  # the RenderResult as far as it got
        self.while_tracking = while_tracking  # it came while MLflow was being written


class ImagesFailed(Exception):
    """Some images of a finished run failed (the command's exit code 3): the manifest holds
    every record, the failed ones with their error."""

    def __init__(self, manifest, failed: list):
        self.manifest, self.failed = manifest, failed
        lines = "\n".join(f"  {r.file}: {r.error}" for r in failed)
        super().__init__(f"{len(failed)} of {len(manifest.images)} images failed:\n{lines}")
