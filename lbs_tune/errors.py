"""The one exception type for user mistakes: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """A mistake in the user's input (a sweep file, a flag, a data folder, a checkpoint).

    The message is one line that names the file, the key and the fix. Bugs raise other types.
    """

    exit_code = 2
