"""The code vLLM loads into its own processes (nothing here runs in behaviorc's).

- `plugin`: in every vLLM process (entry point group `vllm.general_plugins`): the model
  loader, and the watch that stops a server whose launcher is gone.
- `middleware`: in the API server process (`--middleware`): the routes and worker calls
  a server opens, checks of per-request steering, the API key on every route.
- `extension` (`--worker-extension-cls`), with `worker_state`, `steering`, `weights` and
  `vllm_internals` (the one module that reads vLLM's worker internals): in each worker
  process.
- `steer_spec`: the `steer` request argument, read here and written by clients.

The launcher (`behaviorc.engine.vllm.server`) names these to vLLM; nothing here imports
the client side.
"""

# `--load-format`: vLLM's default loader, then behaviorc's steering tables hooked on
# (`vllm_internals.register_steerable_loader`); named here so that the client side
# writes the server's command line without importing what runs inside it.
LOAD_FORMAT = "behaviorc"

# The process id of whoever started the server (`behaviorc serve`, a build, a test), so
# that the server's first process can stop its whole group once that process is gone
# (`plugin.stop_when_orphaned`).
LAUNCHER_ENV = "BEHAVIORC_SERVER_LAUNCHER"
