"""Deployment on Flower's engine: ``fedct server start|submit|check`` and ``fedct site``.

Server side (the consortium's coordinator, one host):

- ``fedct server start --env server.env`` validates the env file and runs three processes in the foreground
  (SIGTERM stops them all; if one ends, the others are stopped):

  * ``flower-superlink`` bound to **127.0.0.1** only (Flower 1.41 serves its Fleet, Control and Runtime APIs on
    one port), with TLS, SuperNode authentication, runtime dependency installation off, telemetry off, its state
    database on disk and ``--isolation process`` + ``--superexec-auth-secret-file`` (a random secret in the state
    folder): the Runtime API hands ServerApp tasks only to a caller that proves the secret;
  * ``flower-superexec`` with that secret, which runs each ServerApp (``flwr-serverapp``) on this host;
  * **nginx** (the distribution's package) on ``FEDCT_SERVER_HOST:FEDCT_SERVER_PORT``, the only address hospitals
    are given: it terminates TLS with the server certificate and forwards ``POST /v1/fleet/*`` (the Fleet API a
    SuperNode uses) to the loopback SuperLink; run submission, node registration, listing, logs (Control API) and
    the Runtime API answer 403 there. Flower 1.41 has no flag that splits the Control API off the Fleet port and no
    account authentication outside its enterprise edition, hence the proxy.

  Between the SuperLink and the proxy it registers every site public key found in ``FEDCT_SITE_KEYS``
  (``flwr supernode register``, on loopback) and writes ``STATE/site-registry.json`` (``{node id: site name}``,
  matched by public key), exported to the ServerApp as ``FEDCT_SITE_REGISTRY``.
- ``fedct server submit --env server.env --config run.toml`` starts a run: ``flwr run APP consortium`` with an
  isolated Flower home (``config.toml``: address + root certificates) and the run config (rounds, strategy,
  minimum sites, round timeout; ``run-dir`` made absolute under ``FEDCT_RUNS_DIR``).
- ``fedct server check --env server.env`` is the TLS health check (the hospital-facing port and the loopback
  SuperLink).
- Run submission, registration, ``flwr ls``/``log`` go to 127.0.0.1:FEDCT_SUPERLINK_PORT only.

Site side (each hospital): ``fedct site --env site.env`` (see :mod:`fl_client.site_env`) validates the env file,
checks the TLS handshake with the SuperLink against the CA (a clear message instead of Flower's "unavailable"),
ingests the DICOM folder, installs the app-approval launcher (:mod:`fl_client.approval`) and runs
``flower-supernode`` (``--root-certificates``, ``--auth-supernode-private-key``, ``--node-config``, its own port)
in the foreground, retrying for a while when the SuperLink refuses to activate it (a restart right after a crash).
With ``FEDCT_CLIENTAPP_RUNNER=warm`` (the default) the SuperNode runs with ``--isolation process`` and ``fedct site``
runs fedct's warm executor (:mod:`fl_client.executor`) next to it as a second child: it imports torch/MONAI once
and forks a child per message instead of Flower's fresh ``flwr-clientapp`` process (about 7 CPU-s saved per
message), checks the same allow-list, authenticates to the SuperNode with a shared secret, and never outlives
the site (stopped with the SuperNode; ``--parent-pid`` ends it if ``fedct site`` is killed).

Modules: :mod:`~fedct.deploy.tls` (TLS preflight), :mod:`~fedct.deploy.server_env` (the server env file),
:mod:`~fedct.deploy.commands` (every command line fedct starts), :mod:`~fedct.deploy.proxy` (nginx config),
:mod:`~fedct.deploy.server` (coordinator), :mod:`~fedct.deploy.site` (hospital site), :mod:`~fedct.deploy.supervisor`
(SuperNode + warm executor lifetimes), :mod:`~fedct.deploy.cli` (argument parsing); the names below are re-exported.
"""

from __future__ import annotations

from fedct.deploy.cli import add_server_parser, add_site_parser
from fedct.deploy.commands import (
    TlsFiles,
    executor_command,
    flower_superlink,
    flower_supernode,
    node_config_arg,
    proxy_command,
    proxy_executable,
    superexec_command,
    superlink_command,
    supernode_command,
    supernode_env,
    warm_executor,
)
from fedct.deploy.common import (
    CONNECTION,
    FLOWER_ENV,
    DeployError,
    flower_env,
    flower_tool,
    toml_value,
    write_flwr_home,
)
from fedct.deploy.proxy import FLEET_API_PREFIX, PROXY_MAX_BODY, PROXY_REFUSAL, proxy_config, write_proxy_config
from fedct.deploy.server import (
    SITE_REGISTRY_ENV,
    NodeRecord,
    Submitted,
    ensure_server_secret,
    register_sites,
    registered_nodes,
    run_config_for,
    run_status,
    start_server,
    submit_run,
    write_site_registry,
)
from fedct.deploy.server_env import SERVER_KEYS, SERVER_REQUIRED, SUPERLINK_STATES, ServerEnv
from fedct.deploy.site import ensure_superexec_secret, executor_pids, ingest, start_site, supernode_pids
from fedct.deploy.supervisor import (
    ACTIVATED,
    ACTIVATION_REFUSED,
    ACTIVATION_RETRY_S,
    EXECUTOR_FAILED,
    EXECUTOR_MAX_RESTARTS,
    EXECUTOR_PREFIX,
    EXECUTOR_STOP_GRACE_S,
    STOP_GRACE_S,
    ExecutorSupervisor,
    port_listening,
    run_supernode,
)
from fedct.deploy.tls import check_tls, wait_for_tls

__all__ = [
    "ACTIVATED",
    "ACTIVATION_REFUSED",
    "ACTIVATION_RETRY_S",
    "CONNECTION",
    "EXECUTOR_FAILED",
    "EXECUTOR_MAX_RESTARTS",
    "EXECUTOR_PREFIX",
    "EXECUTOR_STOP_GRACE_S",
    "FLEET_API_PREFIX",
    "FLOWER_ENV",
    "PROXY_MAX_BODY",
    "PROXY_REFUSAL",
    "SERVER_KEYS",
    "SERVER_REQUIRED",
    "SITE_REGISTRY_ENV",
    "STOP_GRACE_S",
    "SUPERLINK_STATES",
    "DeployError",
    "ExecutorSupervisor",
    "NodeRecord",
    "ServerEnv",
    "Submitted",
    "TlsFiles",
    "add_server_parser",
    "add_site_parser",
    "check_tls",
    "ensure_server_secret",
    "ensure_superexec_secret",
    "executor_command",
    "executor_pids",
    "flower_env",
    "flower_superlink",
    "flower_supernode",
    "flower_tool",
    "ingest",
    "node_config_arg",
    "port_listening",
    "proxy_command",
    "proxy_config",
    "proxy_executable",
    "register_sites",
    "registered_nodes",
    "run_config_for",
    "run_status",
    "run_supernode",
    "start_server",
    "start_site",
    "submit_run",
    "superexec_command",
    "superlink_command",
    "supernode_command",
    "supernode_env",
    "supernode_pids",
    "toml_value",
    "wait_for_tls",
    "warm_executor",
    "write_flwr_home",
    "write_proxy_config",
    "write_site_registry",
]
