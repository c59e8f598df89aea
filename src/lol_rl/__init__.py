"""lol-rl: Advantage-Leftover Lunch RL (Baheti et al., ICLR 2024) and its baselines."""

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On cores other jobs
# share, spinning threads starve the thread doing the work (an sft stage took 792 s at 2 threads
# against 162 s at 1); on idle cores the two policies run alike. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
