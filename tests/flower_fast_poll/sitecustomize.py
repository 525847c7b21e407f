"""Test harness only (conftest puts this folder on the PYTHONPATH of every process the tests start): a
`flower-supernode` asks its SuperLink for a message, and when there is none it sleeps a fixed 3 s (flwr
1.41, `start_client_internal`, not configurable). A local test federation then waits up to 3 s per node
and exchange, a third of the Flower tests' time; here that one sleep is 0.2 s. Every other process, and
every other sleep, is left as it is; what is exchanged does not change (the tests compare adapters with
the embedded runtime bit for bit)."""

import os
import sys

if os.path.basename(sys.argv[0] if sys.argv else "") == "flower-supernode":
    import time
    import types

    import flwr.supernode.start_client_internal as supernode

    def pull_again_soon(seconds: float, sleep=time.sleep) -> None:
        sleep(0.2 if seconds == 3 else seconds)

    supernode.time = types.SimpleNamespace(  # type: ignore[attr-defined]
        **{k: getattr(time, k) for k in dir(time) if not k.startswith("__") and k != "sleep"},
        sleep=pull_again_soon,
    )
