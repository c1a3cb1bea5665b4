"""``python -m resnet_lessons`` is the command line (so ``torchrun -m resnet_lessons train`` works)."""

from .cli import main

raise SystemExit(main())
