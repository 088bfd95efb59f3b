"""Exceptions that carry a one-line, user-facing message.

The CLI prints these as a single line and exits non-zero; the message always names the
config key, file or value at fault and how to fix it.
"""


class RLFlowError(Exception):
    """Base class: a mistake in the user's config, data or environment, not a bug in rlflow."""


class ConfigError(RLFlowError, ValueError):
    """An unknown key, a wrongly typed value, an unknown recipe or inconsistent settings."""


class DataError(RLFlowError, ValueError):
    """A missing, unreadable or malformed data file."""


class ClusterError(RLFlowError, RuntimeError):
    """Ray cannot be reached or cannot fit the requested workers."""


class RewardError(RLFlowError, ValueError):
    """A reward function that breaks its contract: its signature, what it returns, or a row
    it cannot score (see ``rlflow.rewards.contract``)."""


class DiskFullError(RLFlowError, OSError):
    """The disk filled up while rlflow wrote to it."""
