"""Spaces-style entry for the explorer: `python app.py [RUNS_DIR]` (default: outputs/).

A thin shell: everything lives in `t2i_eval.explorer.app`. It binds to 127.0.0.1 unless
GRADIO_SERVER_NAME says otherwise (as Hugging Face Spaces does), serves no file by path (run
images only, looked up by run and record), and imports no torch unless the live tab runs a prompt.
"""

from __future__ import annotations

import os
import sys

from t2i_eval.errors import UserError
from t2i_eval.explorer.app import launch


def main() -> int:
    runs = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("T2I_EVAL_RUNS", "outputs")
    port = os.environ.get("GRADIO_SERVER_PORT", "")
    try:
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise UserError(f"GRADIO_SERVER_PORT={port!r}: expected a port number 1..65535")
        launch(
            runs,
            host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
            port=int(port) if port else None,
        )
    except UserError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
