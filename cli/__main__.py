"""``python -m taskfold.cli`` (what ``torchrun ... -m taskfold.cli train`` runs)."""
import sys

from taskfold.cli.main import main

sys.exit(main())
