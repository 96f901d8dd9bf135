"""The exceptions sparknet raises on purpose.

All carry a plain message (naming the file, column or key, what was found and what
was expected) and pickle by message alone, so one raised in an executor reaches the
driver intact.
"""

import re


def spark_error_summary(exc: BaseException, lines: int = 2) -> str:
    """The first meaningful lines of a Spark/py4j error: its error class and message,
    without the JVM stack."""
    text = str(exc)
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("'", "+-", ":-", "== ", "JVM stacktrace")):
            break  # a query plan or the JVM stack follows: the message is complete
        if not line or line.startswith(("at ", "Traceback", "File ")):
            continue
        kept.append(line)
        if len(kept) == lines:
            break
    return " ".join(kept) or type(exc).__name__


def sparknet_error_in(exc: BaseException) -> str | None:
    """The message of a SparknetError raised inside a Spark task, from the Python
    traceback that Spark's error carries; None when it carries none."""
    found = re.findall(r"sparknet\.errors\.(\w+Error): (.*)", str(exc))
    return found[-1][1].strip() if found else None


# Spark's ANSI mode (on by default since 4.0) fails the whole job on these, on one row.
ROW_ERRORS = ("DIVIDE_BY_ZERO", "CAST_INVALID_INPUT", "ARITHMETIC_OVERFLOW", "CAST_OVERFLOW")


def row_error_class(exc: BaseException) -> str | None:
    """The ANSI row-level error class of a Spark failure, if it is one."""
    text = str(exc)
    return next((c for c in ROW_ERRORS if f"[{c}]" in text), None)


class SparknetError(Exception):
    """Base of every error sparknet raises on purpose."""

    def __reduce__(self):
        return (type(self), (str(self),))


class ConfigError(SparknetError):
    """The YAML config is missing a key, has an unknown one, or a value out of range."""


class DataError(SparknetError):
    """The input data as a whole cannot be used (missing column, empty file, ...)."""


class RunDirError(SparknetError):
    """A stage's input is missing from the run directory."""


class TrainingError(SparknetError):
    """Distributed training failed; the message carries the failing rank's cause."""
