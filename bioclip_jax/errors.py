"""The one exception type for bad input (a file, a value, an option): the command line prints it as one line.

Anything else that escapes is a bug and keeps its traceback. `InputError` is a ValueError, so callers that catch
ValueError keep working."""


class InputError(ValueError):
    """Bad user input: the message names the file, key or value and what was expected."""


class ResourceError(RuntimeError):
    """The machine ran out of something the run needs (disk space, device memory): one line saying what to do."""


class UnreachableError(ResourceError):
    """A remote store (a gs:// bucket) could not be reached over the network: one line naming the URL, exit 1 like
    other resources, since the same command may work once the network is back."""


def first_line(error: BaseException) -> str:
    """`Type: first line of the message` (or just the type when the message is empty): how an exception from another
    library is named inside our one-line errors."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
