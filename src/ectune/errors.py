"""ectune's own error type: every expected failure (bad data, bad config, bad checkpoint) raises it.

The CLI turns it into a one-line message and exit code 2.
"""


class EctuneError(Exception):
    """A failure the user can fix; the message says what was wrong and what to do."""
