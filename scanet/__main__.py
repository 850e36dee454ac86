"""``python -m scanet`` (and ``torchrun --nproc_per_node=N -m scanet train ...``): the command-line interface."""
from scanet.cli import main

raise SystemExit(main())
