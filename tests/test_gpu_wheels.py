"""scripts/gpu_wheels.py's plan and checks, and gpu_check.sh's offline install (no network: the
resolver's reports are synthetic and pip is a stub)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def fake_wheel(folder: Path, name: str, mib: float = 0.0) -> Path:
    path = folder / name
    with path.open("wb") as f:
        f.truncate(int(mib * gpu_wheels.MIB))  # sparse: no disk used
    return path


def item(name, version, requires=(), extras=()):
    return {
        "metadata": {"name": name, "version": version, "requires_dist": list(requires)},
        "requested_extras": list(extras),
    }


def test_wheel_names_are_normalised():
    assert gpu_wheels.wheel_name_version(
        "faiss_cpu-1.15.1-cp310-abi3-manylinux_2_28_x86_64.whl"
    ) == (
        "faiss-cpu",
        "1.15.1",
    )
    assert gpu_wheels.wheel_name_version("foo-1.0-1build-py3-none-any.whl") == ("foo", "1.0")
    with pytest.raises(ValueError):
        gpu_wheels.wheel_name_version("notawheel.tar.gz")


def test_check_dir_wants_one_version_each_and_the_cap(tmp_path):
    fake_wheel(tmp_path, "conan_embedding-0.1.0-py3-none-any.whl", 0.3)
    fake_wheel(tmp_path, "faiss_cpu-1.15.1-cp310-abi3-manylinux_2_28_x86_64.whl", 18)
    assert gpu_wheels.check_dir(tmp_path, 60) == ([], pytest.approx(18.3))
    fake_wheel(tmp_path, "faiss_cpu-1.14.0-cp310-abi3-manylinux_2_28_x86_64.whl", 50)
    problems, total = gpu_wheels.check_dir(tmp_path, 60)
    assert total == pytest.approx(68.3)
    assert any("faiss-cpu: 2 versions" in p for p in problems)
    assert any("over the 60 MiB cap" in p for p in problems)
    (tmp_path / "conan_embedding-0.1.0-py3-none-any.whl").unlink()
    assert "no conan_embedding wheel" in gpu_wheels.check_dir(tmp_path, 100)[0]


def test_check_only_exit_status(tmp_path):
    fake_wheel(tmp_path, "conan_embedding-0.1.0-py3-none-any.whl", 0.3)
    fake_wheel(tmp_path, "polars_runtime_32-2.1.0-cp311-abi3-manylinux2014_x86_64.whl", 61)
    script = [sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "--check-only"]
    over = subprocess.run([*script, str(tmp_path)], capture_output=True, text=True)
    assert over.returncode == 1 and "over the 60 MiB cap" in over.stderr
    assert subprocess.run([*script, "--max-mib", "70", str(tmp_path)]).returncode == 0


def test_plan_ships_what_the_image_lacks_and_leaves_mteb_only_deps_out():
    full = {
        "install": [
            item(
                "conan-embedding",
                "0.1.0",
                [
                    "torch>=2.4",
                    "mteb==2.26.24",
                    "pydantic>=2.6",
                    "faiss-cpu>=1.8",
                    'fastapi>=0.110; extra == "serve"',
                    'colorama; platform_system == "Windows"',
                ],
                extras=["serve"],
            ),
            item("torch", "2.13.0", ["numpy"]),
            item("numpy", "2.4.6"),
            item("mteb", "2.26.24", ["polars>=1", "numpy", "pydantic>=2.11"]),
            item("polars", "2.1.0", ["polars-runtime-32==2.1.0"]),
            item("polars-runtime-32", "2.1.0"),
            item("pydantic", "2.13.4", ["pydantic-core==2.46.4"]),
            item("pydantic-core", "2.46.4"),
            item("faiss-cpu", "1.15.1", ["numpy>=1.25"]),
            item("fastapi", "0.165.0", ["starlette>=1.6"]),
            item("starlette", "1.10.0"),
            item("colorama", "0.4.6"),
            item("tensorboard", "2.21.0"),
        ]
    }
    image = {
        "install": [
            item("torch", "2.13.0"),
            item("numpy", "2.4.6"),
            item("pydantic", "2.14.4"),
            item("tensorboard", "2.21.0"),
        ]
    }
    ship, left_out = gpu_wheels.plan(full, image, with_mteb=False)
    assert set(ship) == {
        "conan-embedding",
        "pydantic",
        "pydantic-core",
        "faiss-cpu",
        "fastapi",
        "starlette",
    }  # pydantic: older images lack it; colorama: Windows only
    assert ship["pydantic"] == "2.13.4"
    assert left_out == {"mteb": "2.26.24", "polars": "2.1.0", "polars-runtime-32": "2.1.0"}
    ship, left_out = gpu_wheels.plan(full, image, with_mteb=True)
    assert {"mteb", "polars", "polars-runtime-32"} <= set(ship) and not left_out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_sh_installs_offline_then_passes_the_other_arguments_on(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in (
        "conan_embedding-0.1.0-py3-none-any.whl",
        "faiss_cpu-1.15.1-cp310-abi3-x.whl",
        "pydantic_core-2.46.4-cp312-cp312-x.whl",
    ):
        fake_wheel(wheels, name)
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"  # records each call, one line each, with two variables
    stub.write_text(
        f'#!/usr/bin/env bash\necho "$* | $TOKENIZERS_PARALLELISM $HF_HUB_OFFLINE" >> {calls}\n'
    )
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--wheels",
            str(wheels),
            "--out",
            "x y",
        ],
        env={**env, "PYTHON": str(stub)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith(
        f"-m pip install --disable-pip-version-check --no-index "
        f"--find-links {wheels} faiss_cpu pydantic_core |"
    )
    assert lines[1].startswith("-m pip install") and "--no-deps --force-reinstall" in lines[1]
    assert lines[1].split(" | ")[0].endswith("conan_embedding-0.1.0-py3-none-any.whl")
    assert lines[2].startswith("-m pip check")
    assert lines[3] == "scripts/gpu_check.py --device cpu --out x y | false 1"
    bad = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--wheels", str(tmp_path / "none")],
        env={**env, "PYTHON": str(stub)},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no folder" in bad.stderr
