"""Imported by a fork server in tests (``gipc.set_forkserver_preload``): a module whose
import ends the interpreter (``sys.exit``), as a script imported by mistake might."""

import sys

sys.exit(3)
