"""The MeshCentral backend: :class:`MeshCentralExecutor`, over libmeshctrl.

Only this package imports ``meshctrl``; the core never does (checked by import-linter).
"""

from ._executor import MeshCentralExecutor

__all__ = ["MeshCentralExecutor"]
