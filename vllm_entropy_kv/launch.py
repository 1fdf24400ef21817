"""Start and stop a real `vllm serve` on the embedded model: used by `make serve`, the tests,
the benchmark and the load tests, so all of them run the server the same way.

`python -m vllm_entropy_kv.launch [--port P] [--policy P] [-- extra vllm flags]` execs
`vllm serve` in the foreground; `VllmServer` runs it in the background for programs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from vllm_entropy_kv import assets
from vllm_entropy_kv.cpu import cpu_info

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Eager mode only for start-up time: Inductor compilation costs minutes on 2 cores, and
# compiled mode works with a policy (`--no-enforce-eager` undoes this; tests/test_compiled.py).
# Compiled and eager bf16 servers may round differently, so compare outputs within one mode.
# The dtype follows the CPU (`cpu.CpuInfo.fast_dtype`) unless `--dtype` is given.
CPU_DEFAULT_FLAGS: tuple[str, ...] = (
    "--max-model-len", "8192",
    "--enforce-eager",
)
DEFAULT_KV_CACHE_GIB = "2"
# Our entry points: the general plugin (flags, engine) and the endpoint plugin.
VLLM_PLUGIN_NAMES: tuple[str, ...] = ("entropy_kv", "entropy_kv_api")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((DEFAULT_HOST, 0))
        return s.getsockname()[1]


def pool_flags(policy: str | None, kv_tokens: int, block_size: int | None = None,
               max_model_len: int | None = None) -> list[str]:
    """`vllm serve` flags for a KV pool of `kv_tokens` tokens of full KV (every layer), the
    same memory whatever the policy. `VLLM_CPU_KVCACHE_SPACE` counts whole GiB only. Blocks
    have the size a policy sets unless `block_size` is given (e.g. vLLM's own default for a
    stock server); with `none` a block holds them for every layer, with a policy each layer
    has its own KV cache group and a block holds them for one layer. The model length is
    `max_model_len` if given, else the most the pool holds, up to 4096."""
    if block_size is None:
        # Imported here: the engine package loads vLLM, which `make serve` need not wait for.
        from vllm_entropy_kv.engine.setup import COMPRESSION_BLOCK_SIZE as block_size

    blocks = kv_tokens // block_size
    if policy not in (None, "none"):
        config = json.loads((assets.prepare_model() / "config.json").read_text())
        blocks *= int(config["num_hidden_layers"])
    return ["--block-size", str(block_size), "--num-gpu-blocks-override", str(blocks),
            # vLLM refuses a model length the pool could not hold once.
            "--max-model-len", str(max_model_len or min(4096, kv_tokens // block_size
                                                         * block_size))]


def metric(url: str, name: str, label: str = "") -> float:
    """Sum of a metric's samples on the server's /metrics (0 when absent), only those whose
    labels contain `label` (e.g. `policy="entropy"`) if given."""
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith((name + "{", name + " ")) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_idle_cache(url: str, timeout_s: float = 60) -> float:
    """Wait until no KV block is in use (`vllm:kv_cache_usage_perc`, a fraction despite its
    name, back to 0); return the last usage seen."""
    deadline = time.monotonic() + timeout_s
    usage = metric(url, "vllm:kv_cache_usage_perc")
    while usage > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        usage = metric(url, "vllm:kv_cache_usage_perc")
    return usage


def vllm_executable() -> str:
    beside_python = Path(sys.executable).with_name("vllm")
    return str(beside_python) if beside_python.exists() else shutil.which("vllm") or "vllm"


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value given to `flag` (`--flag V` or `--flag=V`) in a command line."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def default_dtype() -> str:
    """The dtype the launcher serves when no `--dtype` is given: the CPU's fast one."""
    return cpu_info().fast_dtype()[0]


def serve_command(
    model: str | None = None,
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    policy: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The `vllm serve` command line: embedded model and CPU defaults, then `extra_args`
    (later flags win in argparse, so callers can override any default)."""
    dtype, reason = cpu_info().fast_dtype()
    if (given := flag_value(extra_args, "--dtype")) is not None:
        dtype, reason = given, f"--dtype {given} given (the CPU's fast dtype is {dtype}: {reason})"
    print(f"[launch] {cpu_info().describe()}: serving {dtype}: {reason}", file=sys.stderr,
          flush=True)
    command = [
        vllm_executable(), "serve", model or str(assets.prepare_model()),
        "--served-model-name", assets.SERVED_MODEL_NAME,
        "--host", host, "--port", str(port),
        *CPU_DEFAULT_FLAGS, "--dtype", dtype,
    ]
    if policy is not None:
        command += ["--kv-policy", policy]
    return command + list(extra_args)


def serve_environment(kv_cache_gib: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = kv_cache_gib or env.get(
        "VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB
    )
    # No model hub on these machines; never try to reach one.
    env.setdefault("HF_HUB_OFFLINE", "1")
    # One core for the engine core's busy loop, the rest for the worker: vLLM's default,
    # pinned so that servers with and without a KV connector run the same thread count.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    # On a 2-core CPU beside other servers (tests, benchmarks) a long prefill step can outlast
    # vLLM's 300 s step timeout, which kills the engine.
    env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1200")
    # vLLM loads endpoint plugins (GET /v1/kv-policy) only when VLLM_PLUGINS names them, and
    # VLLM_PLUGINS then filters the general plugins too: name both of ours, keep any others.
    names = [n for n in env.get("VLLM_PLUGINS", "").split(",") if n.strip()]
    env["VLLM_PLUGINS"] = ",".join(names + [n for n in VLLM_PLUGIN_NAMES if n not in names])
    return env


class VllmServer:
    """A background `vllm serve`, its log in a file; use as a context manager."""

    def __init__(
        self,
        log_path: Path,
        port: int = DEFAULT_PORT,
        policy: str | None = None,
        extra_args: Sequence[str] = (),
        kv_cache_gib: str | None = None,
        startup_timeout_s: float = 600,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.url = f"http://{DEFAULT_HOST}:{port}"
        self.log_path = log_path
        self.command = serve_command(port=port, policy=policy, extra_args=extra_args)
        self.env = {**serve_environment(kv_cache_gib), **(extra_env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # so stop() can signal vLLM's whole process group
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {self.process.returncode}; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout_s}s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run `vllm serve` on the embedded model with CPU defaults. "
        "Arguments after `--` go to vllm serve unchanged."
    )
    parser.add_argument("--model", default=None, help="model dir (default: embedded model)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--policy", default=None, help="--kv-policy value")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    command = serve_command(args.model, args.port, args.host, args.policy, extra)
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, serve_environment())


if __name__ == "__main__":
    main()
