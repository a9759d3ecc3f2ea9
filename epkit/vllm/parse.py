"""Parse ``vllm serve`` argv lists with vLLM's own argument parser.

Run this file with the Python of an environment that has vLLM installed (it imports
nothing from epkit): it reads a JSON list of argv lists (``["vllm", "serve", MODEL,
…]``) on stdin and writes one JSON object per argv with the parsed values that EP
deployments depend on, or the parser's error. epkit uses it to prove that rendered
commands mean what the topology says (`epkit plan --check-with-vllm PYTHON`).
"""

import contextlib
import dataclasses
import io
import json
import sys

FIELDS = (
    "model", "tensor_parallel_size", "data_parallel_size", "data_parallel_size_local",
    "data_parallel_start_rank", "data_parallel_address", "data_parallel_rpc_port",
    "enable_expert_parallel", "all2all_backend", "headless", "api_server_count", "enable_eplb",
    "max_model_len", "gpu_memory_utilization", "nnodes", "node_rank", "master_addr", "master_port",
)
NO_VLLM_STATUS = 3  # epkit.vllm.check reads this status as "no vLLM under this Python"


def _parser():
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()  # no GPU here: the parser only needs a platform object
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def parse_all(argvs):
    parser = _parser()
    out = []
    for argv in argvs:
        if list(argv[:2]) != ["vllm", "serve"]:
            out.append({"ok": False, "error": f"not a `vllm serve` command: {argv[:2]}"})
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                ns = parser.parse_args(list(argv[2:]))
        except SystemExit:
            text = stderr.getvalue().strip()
            start = text.rfind("vllm serve: error:")  # drop the usage block before the message
            out.append({"ok": False, "error": text[start:] if start >= 0 else text[-2000:]})
            continue
        values = {name: _plain(getattr(ns, name, None)) for name in FIELDS}
        if getattr(ns, "model_tag", None):
            values["model"] = ns.model_tag
        values["eplb_config"] = _plain(getattr(ns, "eplb_config", None))
        values["kv_transfer_config"] = _plain(getattr(ns, "kv_transfer_config", None))
        out.append({"ok": True, "values": values})
    return out


def main():
    import importlib.metadata

    try:
        version = importlib.metadata.version("vllm")
        import vllm  # noqa: F401 - metadata alone can outlive a removed package
    except Exception as exc:  # PackageNotFoundError, ImportError, or vLLM failing at import
        print(f"import vllm failed under {sys.executable}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(NO_VLLM_STATUS)
    argvs = json.load(sys.stdin)
    result = {"vllm_version": version, "results": parse_all(argvs)}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
