"""`python -m ddsm_search` runs the command-line interface."""

from .cli import main

raise SystemExit(main())
