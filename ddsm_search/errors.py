"""The one exception type users see: the CLI prints its message on one line and exits with status 2."""


class DDSMError(Exception):
    """A problem with the user's input (file, config key, width, budget): message names the problem."""
