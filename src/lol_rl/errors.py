"""The one error base: anything a user can fix (bad data, a bad config value, a missing model,
a damaged artifact) is a `LolRlError`, which the CLI prints as one line and exits 2 on. Each
module keeps its own subclass so the line says where it came from; nothing else is caught."""


class LolRlError(Exception):
    """A problem the user can fix; its message is the whole story, in one line."""


class ConfigError(LolRlError, ValueError):
    """A config value outside its range, or an algorithm the task cannot run; raised before any stage."""
