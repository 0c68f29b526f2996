"""The test process's environment, set before any library reads it (conftest imports this first)."""

import os
import signal
import tempfile
from pathlib import Path

# No test reads the user's settings, the checkout's data directory or an earlier run's
# files. Every `TWOSTAGE_*` variable of the caller's goes (but `TWOSTAGE_CPU_FEATURES`, which
# says what machine to act as, not how to run), and the tests run in a fresh directory, where the
# relative defaults (`.twostage/data`, its `settings.env`, `.twostage/cache`) start empty; so does
# the hub cache. Subprocesses inherit all of it.
for name in [n for n in os.environ if n.startswith("TWOSTAGE_") and n != "TWOSTAGE_CPU_FEATURES"]:
    del os.environ[name]
HOME = Path(tempfile.mkdtemp(prefix="twostage-tests-"))  # conftest runs the tests in it (after collection,
# so paths on the command line, `--ignore` ones too, still mean what they say)
os.environ["HF_HOME"] = str(HOME / "hf-home")
# torch.compile's kernels too: a cache an earlier run filled served another function's kernel once
# (`fused_int8._BY_LEVELS`)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(HOME / "inductor")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# parity with the official fp32 recipes is what most tests pin; dtype=auto (bf16 where this CPU
# has it, per measured model) has its own tests in test_numerics.py, which set dtype explicitly
os.environ["TWOSTAGE_DTYPE"] = "float32"
# Under pytest-xdist (`-n N`) each worker takes an equal share of the cores for torch's threads,
# in this process and in the CLI subprocesses its tests start: two workers of one thread each
# keep both cores busy through the single-threaded stretches (imports, model loading, servers
# starting) that a lone two-thread process leaves one core idle in.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))
# Ctrl-C as a terminal gives it, to the CLI subprocesses the Ctrl-C tests interrupt: a runner started
# in the background by a script (`.ci/run &`) has SIGINT ignored, which its children would inherit
# through exec (a caught signal is reset to the default there; an ignored one stays ignored)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
