"""The ``sparsejax lottery`` driver: iterative magnitude pruning with rewinding.

Not implemented yet.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add this module's subcommands to the ``sparsejax`` parser; returns their handlers."""
    del commands
    return {}
