"""`python -m qkv` is the same as the `qkv` command."""

from qkv.cli import entry

entry()
