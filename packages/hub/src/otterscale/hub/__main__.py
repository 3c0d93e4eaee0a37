"""``python -m otterscale.hub``: the same as ``otterscale server``."""

from ._cli import console_main

console_main()
