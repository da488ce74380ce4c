"""Errors a user can act on. The CLI prints their message on one line, without a traceback."""


class HistosslError(Exception):
    """Anything that is wrong with the input or the environment, not with histossl itself.

    The message names the file, key or value at fault. Exit code 1.
    """

    exit_code = 1


class ConfigError(HistosslError):
    """A bad configuration or command line: unknown key, wrong type, value out of range. Exit code 2."""

    exit_code = 2


class DataError(HistosslError):
    """A data set that cannot be used as asked: missing path, unreadable image, class too small."""


class Diverged(HistosslError):
    """Training produced a non-finite loss or non-finite outputs (an lr too large, an exploding run).

    A downstream run that diverges is recorded as such and the study goes on; a pretraining stage
    that diverges stops the study, naming the stage.
    """
