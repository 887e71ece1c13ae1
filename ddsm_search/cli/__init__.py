"""The `ddsm-search` command line (`main.main`): one module per command family, shared options in `args`."""
