"""Make PyPI's CUDA-built torchvision importable next to a CPU-only torch (idempotent).

Why: open-clip-torch and timm need torchvision, and PyPI's torchvision wheel is built for CUDA.
On a ``+cpu`` torch its C extension fails to load silently, and then two module-level
``@torch.library.register_fake("torchvision::nms"/"qnms")`` decorators raise
``RuntimeError: operator torchvision::nms does not exist`` on ``import torchvision``.
The pure-Python parts (transforms, models) are all this project needs, so we rewrite those two
decorators to torchvision's own ``@register_meta(...)``, which skips registration when the
extension is missing. A machine whose torchvision imports cleanly is left untouched.

This is the one place the project deals with that problem; the Makefile runs it after install.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path


def torchvision_imports() -> bool:
    """Import torchvision in a fresh interpreter (a failed import poisons this one)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import torchvision"], capture_output=True, text=True
    )
    return proc.returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("fix_torchvision: torchvision not installed; nothing to do")
        return 0
    if torchvision_imports():
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    patched, n = re.subn(
        r'@torch\.library\.register_fake\("torchvision::(q?nms)"\)',
        r'@register_meta("\1")',
        text,
    )
    if n == 0:
        print(
            f"fix_torchvision: import fails and {path} has no decorator to patch", file=sys.stderr
        )
        return 1
    path.write_text(patched)
    if not torchvision_imports():
        print("fix_torchvision: patched, but `import torchvision` still fails", file=sys.stderr)
        return 1
    print(f"fix_torchvision: patched {n} decorators in {path} (CPU torch + CUDA torchvision wheel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
