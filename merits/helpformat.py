"""``--help`` that shows every option's default (``label_with_llm.py``, ``merits``): argparse's
``ArgumentDefaultsHelpFormatter`` shows it only for options that have a help text and prints long defaults (the
LLM prompt) whole; this one adds ``(default: X)`` to every option with a default, abbreviates long ones and leaves
a help text that already names its default alone. Secrets (an API key taken from the environment) are never shown."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    MAX_DEFAULT = 60

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or not action.option_strings
                or "default" in text.lower() or isinstance(action, argparse._HelpAction)
                or any(secret in action.dest for secret in ("key", "token", "password", "secret"))):  # never echo a secret
            return text
        shown = str(default)
        if len(shown) > self.MAX_DEFAULT or "\n" in shown:
            shown = repr(shown[: self.MAX_DEFAULT - 10].split("\n")[0] + " ...")
        shown = shown.replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"
