"""Flower's in-process simulation with a run config: the example's only use of Flower's internals.

Flower's ``run_simulation`` (its Python API) leaves ``context.run_config`` empty: a run config is an
app's ``[tool.flwr.app.config]`` (this directory's pyproject.toml) with the run's overrides, and only
the simulation behind ``flwr run`` passes it on. :func:`run_simulation_with_config` starts that
simulation in this process, as ``run_simulation`` does, so that the ServerApp can hand its outcome
to the caller.

It makes the run the way ``flwr.simulation.run_simulation._run_simulation`` makes one when given
none, plus the overrides. That code moved between Flower releases; what is here follows it in every
release from 1.24 to 1.42 (CI runs the example on 1.24.0 and 1.42.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import constant
from flwr.common.config import get_fused_config_from_dir
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp import ServerApp
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore import constant as supercore_constant

try:  # Flower 1.32 and later
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType
except ImportError:  # Flower 1.24 to 1.31
    from flwr.common.telemetry import EventType
    from flwr.common.typing import Run  # type: ignore[no-redef]


def new_run(run_config: dict[str, Any]) -> Any:
    """A run as ``_run_simulation`` makes one, with ``run_config`` as its overrides."""
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(constant.RUN_ID_NUM_BYTES))
    if hasattr(constant, "TASK_ID_NUM_BYTES"):  # Flower 1.30 and later: a run has a primary task
        run.primary_task_id = generate_rand_int_from_bytes(constant.TASK_ID_NUM_BYTES)
    if hasattr(supercore_constant, "NOOP_FEDERATION_ID"):  # Flower 1.33 and later
        run.federation_id = supercore_constant.NOOP_FEDERATION_ID
    else:
        run.federation = supercore_constant.NOOP_FEDERATION
    try:  # Flower 1.38 and later: the task this process runs
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        pass
    else:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, constant.SUPERLINK_NODE_ID
    run.override_config = dict(run_config)
    return run


def run_simulation_with_config(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    run_config: dict[str, Any],
    app_dir: str,
    backend_config: dict[str, Any],
) -> None:
    """Flower's ``run_simulation``, with ``run_config`` as the run config's overrides (``flwr run
    --run-config``) on the app in ``app_dir``; a key its pyproject.toml lacks raises."""
    run = new_run(run_config)
    fused = get_fused_config_from_dir(Path(app_dir), run.override_config)
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend_config,
        server_app_context=Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused),
        app_dir=app_dir,
        run=run,
        is_app=True,  # the clients' run config: app_dir's pyproject.toml with the run's overrides
    )
