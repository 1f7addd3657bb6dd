"""One sub-package per PEFT method; importing this package registers each of them.

Sub-packages are discovered, not listed, so a new method is a new folder only.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")
