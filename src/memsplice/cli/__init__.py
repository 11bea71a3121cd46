"""The `memsplice` command line. The library never imports this package."""
