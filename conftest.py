"""pytest runs every chapter (nbval) in the smoke profile unless the caller chose another."""

import os

os.environ.setdefault("RESNET_LESSONS_PROFILE", "smoke")
