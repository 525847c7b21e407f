"""What every cotune process starts with, whichever way it was started: the `cotune` command, a Flower
ServerApp or ClientApp that Flower's own processes load, a node worker.

Set once here so the CLI and the Flower processes cannot drift apart: a warning silenced in one and not the
other reached the user's terminal through the Flower log stream.
"""

from __future__ import annotations

import os
import warnings

# transformers 5 deprecates a property that peft still reads on every adapter it wraps: the notice says
# nothing a cotune user can act on, and repeated it in every Flower run's output
_KNOWN_NOISE = ".*is_gradient_checkpointing.*"


def prepare_process() -> None:
    """No model hub traffic, no tokenizer worker threads (processes here fork), known library noise off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=_KNOWN_NOISE, category=FutureWarning)
