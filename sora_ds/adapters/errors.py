"""The one error type of every sora_ds configuration, library or recipe."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that is not allowed.

    ``key`` is the field at fault and ``problem`` the rest of the sentence (the value and what is allowed);
    ``owner`` is the config class. The recipe re-raises these under its own key names, without parsing the text.
    """

    def __init__(self, key: str, problem: str, owner: str = "") -> None:
        self.key, self.problem, self.owner = key, problem, owner
        where = f"{owner}.{key}" if owner else key
        super().__init__(where + ("" if problem.startswith(("=", ":")) else " ") + problem)
