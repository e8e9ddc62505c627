"""A process that dies inside a checkpoint save (a multi-host peer gone: gloo aborts) still
says why on its real stderr, with the path of the full log; a save that goes well leaves no log.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    from jaxmerge import checkpoint
    mngr = checkpoint.manager(sys.argv[1])
    params, opt_state = {"w": jnp.ones((2, 2))}, {"m": jnp.zeros((2,))}
    checkpoint.save(mngr, 1, params, opt_state, {"task": "t"})
    if sys.argv[2] == "abort":
        def dying_save(*args, **kwargs):
            os.write(2, b"gloo: Connection closed by peer [127.0.0.1]:4242\\n")
            os.abort()
        mngr.save = dying_save
        checkpoint.save(mngr, 2, params, opt_state, {"task": "t"})
    """
)


def _run(tmp_path, mode):
    temporary = tmp_path / "tmp"
    temporary.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(temporary), "JAX_PLATFORMS": "cpu"}
    folder = str(tmp_path / f"checkpoints_{mode}")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, folder, mode], env=env, capture_output=True, timeout=120
    )
    return done, sorted(p.name for p in temporary.iterdir() if p.name.startswith("jaxmerge_save_"))


def test_a_save_that_goes_well_leaves_no_log(tmp_path):
    done, logs = _run(tmp_path, "ok")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert logs == []


def test_a_process_dying_in_a_save_prints_the_cause_and_the_log_path(tmp_path):
    done, logs = _run(tmp_path, "abort")
    assert done.returncode == -6  # SIGABRT, as gloo's abort
    stderr = done.stderr.decode()
    assert len(logs) == 1  # the step-1 save's log was removed, the dying one's is kept
    log = str(tmp_path / "tmp" / logs[0])
    said = "jaxmerge: the process stopped during a checkpoint save; its last messages"
    assert f"{said} (all of them in {log}):" in stderr
    assert "gloo: Connection closed by peer [127.0.0.1]:4242" in stderr
    with open(log) as f:
        assert "Connection closed by peer" in f.read()
