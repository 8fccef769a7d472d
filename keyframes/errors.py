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


def is_disk_full(error: BaseException) -> bool:
    import errno

    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
