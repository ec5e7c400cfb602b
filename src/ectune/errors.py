"""ectune's own error type: every expected failure (bad data, bad config, bad checkpoint) raises it.

The CLI turns it into a one-line message and exit code 2.
"""


class EctuneError(ValueError):
    """A failure the user can fix; the message says what was wrong and what to do.

    It is a ValueError (a bad value: data, config, file or flag), so library callers that catch
    ValueError keep working; the CLI catches EctuneError alone, so any other exception is a bug and
    shows as a traceback."""
