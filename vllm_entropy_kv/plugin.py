"""What `register()` installs in each vLLM process. Every step is idempotent, and each
patched hook is inert while the policy is `none`."""

from __future__ import annotations

import functools

from vllm_entropy_kv.cli import install_cli_shim

_WRAPPED_MARK = "_vllm_entropy_kv_wrapped"


def install_runner_binding() -> None:
    """Let the metadata builder map batch rows to request ids through the model runner."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_entropy_kv.engine.worker import compression_worker

    if getattr(GPUModelRunner.__init__, _WRAPPED_MARK, False):
        return
    original = GPUModelRunner.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        compression_worker().bind_runner(self)

    setattr(__init__, _WRAPPED_MARK, True)
    GPUModelRunner.__init__ = __init__


def register_all() -> None:
    from vllm_entropy_kv.engine.backend import register_backend_override
    from vllm_entropy_kv.engine.setup import install_engine_config_hook
    from vllm_entropy_kv.engine.spec import install_layer_spec, register_layer_spec

    install_cli_shim()
    install_engine_config_hook()
    register_backend_override()
    register_layer_spec()
    install_layer_spec()
    install_runner_binding()
