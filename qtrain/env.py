"""`qtrain env`: versions and devices, checked against the supported-versions table below, and the
tokenizer path `qtrain preprocess` would take.

This table is the one place that says what qtrain supports; README.md reproduces it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys
from dataclasses import dataclass

import qtrain
from qtrain.cli import ArgumentParser

# package -> (minimum supported, reason). Versions below the minimum are a known-bad combination.
SUPPORTED: dict[str, tuple[str, str]] = {
    "python": ("3.10", "qtrain uses 3.10 syntax"),
    "torch": ("2.6", "FSDP2 fully_shard, DTensor plans and torch.distributed.pipelining as qtrain uses them"),
    "transformers": ("4.51", "Qwen3 support (tokenizer chat template, parity tests) arrived in 4.51"),
    "safetensors": ("0.4", "safe_open streaming reads"),
    "numpy": ("1.24", "memory-mapped dataset indices"),
    "pyarrow": ("14", "streaming parquet/arrow readers"),
    "tiktoken": ("0.7", "the preprocessing tokenizer's fast path (without it preprocessing runs ~7x slower)"),
}
# torch_npu must be built for the same torch major.minor (Ascend's rule); these pairs are tested upstream.
NPU_PAIRS = {"2.7.1": "7.2.0", "2.6.0": "7.1.0", "2.5.1": "7.0.0"}
OPTIONAL = ("tensorboard", "matplotlib", "peft", "liger-kernel", "megatron-core", "torch_npu")


def _version(package: str) -> str | None:
    if package == "python":
        return platform.python_version()
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _as_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass
class Report:
    versions: dict[str, str | None]
    devices: list[str]
    device_type: str
    cann: str | None
    problems: list[str]
    tokenizer: dict[str, str | None]

    @property
    def ok(self) -> bool:
        return not self.problems


def _cann_version() -> str | None:
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or "/usr/local/Ascend/ascend-toolkit/latest"
    for rel in ("version.cfg", "compiler/version.info", "runtime/version.info"):
        path = os.path.join(home, rel)
        if os.path.isfile(path):
            for line in open(path, encoding="utf-8", errors="replace"):
                if "version=" in line.lower():
                    return line.split("=", 1)[1].strip()
    return None


def preprocess_tokenizer(folder: str | None = None) -> tuple[dict[str, str | None], str | None]:
    """The tokenizer path `qtrain preprocess` takes with `folder` (default: the pip-installed Qwen3
    tokenizer, if any): ({"path": "fast" | "hf" | "unchecked", "tokenizer": dir, "reason": why not
    fast}, problem). "unchecked": tiktoken is there but no tokenizer to run the fast path's self-check on.
    """
    from qtrain.data.tokenizer import find_qwen3_tokenizer, load_tokenizer
    from qtrain.errors import QtrainError

    if folder is None:
        try:
            folder = str(find_qwen3_tokenizer())
        except QtrainError:
            if _version("tiktoken") is None:
                return {"path": "hf", "tokenizer": None, "reason": "tiktoken is not installed"}, None
            return {"path": "unchecked", "tokenizer": None,
                    "reason": "no tokenizer to check here (qtrain env --tokenizer-name-or-path DIR checks one)"}, None
    try:
        tokenizer = load_tokenizer(folder)
    except QtrainError as e:
        return {"path": "hf", "tokenizer": folder, "reason": str(e)}, str(e)
    path = "fast" if tokenizer.is_fast else "hf"
    return {"path": path, "tokenizer": str(tokenizer.path), "reason": tokenizer.fast_reason}, None


def collect(tokenizer: str | None = None) -> Report:
    versions = {name: _version(name) for name in SUPPORTED}
    versions.update({name: _version(name) for name in OPTIONAL})
    problems = []
    for name, (minimum, why) in SUPPORTED.items():
        have = versions[name]
        if have is None:
            problems.append(f"{name} is not installed (qtrain needs >= {minimum}: {why})")
        elif _as_tuple(have) < _as_tuple(minimum):
            problems.append(f"{name} {have} is too old: qtrain needs >= {minimum} ({why})")
    npu = versions.get("torch_npu")
    if npu and versions["torch"]:
        torch_base = versions["torch"].split("+")[0]
        if _as_tuple(torch_base)[:2] != _as_tuple(npu)[:2] and NPU_PAIRS.get(torch_base) != npu.split("+")[0] \
                and not npu.startswith(".".join(torch_base.split(".")[:2])):
            problems.append(f"torch_npu {npu} does not match torch {versions['torch']}: install the torch_npu "
                            f"built for this torch (e.g. torch 2.7.1 + torch_npu 7.2.0)")
    devices, dev_type = [], "cpu"
    try:
        import torch

        from qtrain.device import device_type, npu_available

        dev_type = device_type()
        versions["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            devices = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        elif npu_available():
            devices = [f"npu:{i} {torch.npu.get_device_name(i)}" for i in range(torch.npu.device_count())]
        else:
            devices = [f"cpu ({os.cpu_count()} cores)"]
    except Exception as e:  # a broken torch install is exactly what env must report, not crash on
        problems.append(f"torch failed to import or query devices: {e}")
    tokenizer_path, problem = preprocess_tokenizer(tokenizer)
    if problem:
        problems.append(problem)
    return Report(versions, devices, dev_type, _cann_version() if versions.get("torch_npu") else None, problems,
                  tokenizer_path)


def _describe(tok: dict[str, str | None]) -> str:
    if tok["path"] == "fast":
        return f"tiktoken fast path (self-check passed on {tok['tokenizer']})"
    if tok["path"] == "unchecked":
        return f"tiktoken fast path if the tokenizer passes its self-check; {tok['reason']}"
    return f"HF tokenizer, the slow path ({tok['reason']})"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="qtrain env", allow_abbrev=False,
                                     description="Print versions and devices; exit 1 on a known-bad combination.")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for platform health checks)")
    parser.add_argument("--tokenizer-name-or-path", metavar="DIR", default=None,
                        help="tokenizer dir whose preprocessing path to report (default: the pip-installed Qwen3 "
                             "tokenizer, if any)")
    args = parser.parse_args(argv)
    report = collect(args.tokenizer_name_or_path)
    if args.json:
        print(json.dumps({"qtrain": qtrain.__version__, "ok": report.ok, "device_type": report.device_type,
                          "devices": report.devices, "versions": report.versions, "cann": report.cann,
                          "preprocess_tokenizer": report.tokenizer, "problems": report.problems}, indent=2))
        return 0 if report.ok else 1
    print(f"qtrain       {qtrain.__version__}")
    print(f"platform     {platform.platform()} ({sys.executable})")
    for name, version in report.versions.items():
        minimum = SUPPORTED.get(name, ("",))[0]
        print(f"{name:<12} {version or '-':<20} {'(>= ' + minimum + ')' if minimum else ''}")
    if report.cann:
        print(f"{'CANN':<12} {report.cann}")
    print(f"device type  {report.device_type}")
    for d in report.devices:
        print(f"  {d}")
    print(f"preprocess   {_describe(report.tokenizer)}")
    for p in report.problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print("status       " + ("ok" if report.ok else f"{len(report.problems)} problem(s), see above"))
    return 0 if report.ok else 1
