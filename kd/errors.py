"""User-facing errors: raised anywhere, caught at the entry points (kd.cli.one_line_errors) and
printed as one line, no traceback."""


class KDError(Exception):
    """Bad input from the user (config, data, models); the message names the file/row/key."""


class ConfigError(KDError):
    pass


class DataError(KDError):
    pass


class ModelError(KDError):
    pass
