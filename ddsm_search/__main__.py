"""`python -m ddsm_search` runs the command-line interface."""

from .cli.main import main

raise SystemExit(main())
