"""Fault injection for the resume tests: with `LOL_RL_KILL_AT=<point>` the process SIGKILLs
itself on reaching that point, as an OOM killer or a lost node would (points: `sft:step:<n>`,
`rl:step:<n>`, `rl:checkpoint_write:<n>`, `value:epoch:<n>`, `advantage:scored`,
`eval:generated`, `<stage>:rename`). Unset, which is always outside tests, it is one lookup."""

from __future__ import annotations

import os
import signal


def kill_point(name: str) -> None:
    if os.environ.get("LOL_RL_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
