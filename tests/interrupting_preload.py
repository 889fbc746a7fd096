"""Imported by a fork server in tests (``gipc.set_forkserver_preload``): a module whose
import raises ``KeyboardInterrupt``, as an import interrupted by Ctrl-C does."""

raise KeyboardInterrupt
