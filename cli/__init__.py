"""qkit.cli: the `qkit` command, a thin click shell over the library."""
