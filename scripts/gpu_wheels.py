"""Wheels for a bare GPU machine with no network (run by scripts/gpu_wheels.sh; see its header).

Builds our own wheel and downloads, for CPython 3.12 on manylinux x86_64, the wheels that a
typical GPU image lacks: the closure of ``conan-embedding[serve,llm]`` minus the closure of the
image's own packages (``IMAGE``), plus ``OLDER_IMAGES`` (pydantic / typer and their deps, which
images older than transformers 5 lack). The pip resolver decides both closures (``pip install
--dry-run --report``: metadata only, nothing large is downloaded to resolve), under ``PINS``: the
versions this project is tested with. Then it checks one version per package and the size cap.

mteb's own subtree (mteb, polars + its 51 MiB runtime, pytrec-eval-terrier: ~59 MiB) does not
fit under the 60 MiB cap next to faiss and matplotlib, and scripts/gpu_check.py runs no MTEB
evaluation (``conan_embedding`` imports mteb only in ``evaluation/`` and the decoder ablation's
report), so it is left out unless ``--with-mteb`` (then the cap is ``--max-mib``, 120 by
default for that mode).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

try:  # packaging is everywhere pip is; pip vendors it as a fallback
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
CAP_MIB = 60.0
CAP_MIB_WITH_MTEB = 120.0
EXTRAS = ("serve", "llm")
PYTHON_VERSION = "3.12"
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + [
    "manylinux2014_x86_64",
    "linux_x86_64",
    "any",
]
# what a typical GPU image holds (with their dependencies), at the versions tested here
IMAGE = {
    "torch": "2.13.0",
    "transformers": "5.25.0",
    "sentence-transformers": "6.3.0",
    "accelerate": "1.16.0",
    "peft": "0.21.2",
    "onnxruntime": "1.32.0",
    "scikit-learn": "1.9.1",
    "pandas": "3.1.1",
    "pyarrow": "26.0.1",
    "tensorboard": "2.21.0",
    "pytest": "9.0.3",
}
# in transformers 5's closure (typer -> pydantic, rich) but missing from older images: shipped so
# that pip finds them where needed (an image that has them keeps its own)
OLDER_IMAGES = {
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typer",
    "shellingham",
    "rich",
    "markdown-it-py",
    "mdurl",
    "pygments",
    "annotated-doc",
    "requests",
    "urllib3",
    "certifi",
    "charset-normalizer",
    "idna",
}
# left out by default: only mteb needs them (computed from the dependency graph, not this list;
# this names the root whose subtree goes)
EVAL_ROOT = "mteb"
# versions installed in this project's test environment (pip list); orjson's there (3.8.3) has no
# cp312 wheel
PINS = {
    "mteb": "2.26.24",
    "datasets": "5.2.0",
    "faiss-cpu": "1.15.1",
    "pydantic": "2.13.4",
    "pydantic-core": "2.46.4",
    "gguf": "0.19.0",
    "fastapi": "0.165.0",
    "typer": "0.29.2",
    "httpx": "0.29.0",
    "httpcore": "1.0.9",
    "matplotlib": "3.11.2",
    "uvicorn": "0.55.0",
    "orjson": "3.13.0",
    "starlette": "1.10.0",
    "anyio": "4.16.0",
    "h11": "0.16.0",
    "annotated-types": "0.7.0",
    "typing-inspection": "0.4.2",
    "annotated-doc": "0.0.7",
    "rich": "15.0.0",
    "shellingham": "1.5.4",
    "markdown-it-py": "4.3.0",
    "mdurl": "0.1.2",
    "pygments": "2.20.0",
    "opentelemetry-api": "1.45.3",
    "dill": "0.4.1",
    "xxhash": "4.1.0",
    "multiprocess": "0.70.19",
    "contourpy": "1.3.3",
    "cycler": "0.12.1",
    "fonttools": "4.69.1",
    "kiwisolver": "1.5.1",
    "pyparsing": "3.3.2",
    "polars": "2.1.0",
    "polars-runtime-32": "2.1.0",
    "pytrec-eval-terrier": "0.5.11",
    "requests": "2.34.2",
    "urllib3": "2.7.0",
    "certifi": "2026.5.20",
    "charset-normalizer": "3.4.7",
    "idna": "3.21",
    "numpy": "2.4.6",
    "huggingface-hub": "2.4.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "tqdm": "4.70.1",
    "pyyaml": "6.0.3",
    "filelock": "4.3.2",
    "fsspec": "2026.9.0",
    "packaging": "26.2",
    "typing-extensions": "4.16.0",
    "scipy": "1.17.1",
    "pillow": "13.0.0",
    "python-dateutil": "2.9.0.post0",
    "click": "8.5.1",
    "hf-xet": "1.8.0",
}
TARGET_ENV = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def norm(name: str) -> str:
    """PEP 503 name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalised project name, version) from a wheel's file name."""
    match = WHEEL_RE.match(filename)
    if not match:
        raise ValueError(f"not a wheel file name: {filename}")
    return norm(match["name"]), match["version"]


def check_dir(folder: Path, cap_mib: float) -> tuple[list[str], float]:
    """Problems in a wheel folder (several versions of one package, no or several
    conan_embedding wheels, over the cap) and its total size in MiB."""
    wheels = sorted(folder.glob("*.whl"))
    versions: dict[str, list[str]] = defaultdict(list)
    problems = []
    for wheel in wheels:
        try:
            name, version = wheel_name_version(wheel.name)
        except ValueError as error:
            problems.append(str(error))
            continue
        versions[name].append(version)
    for name, found in sorted(versions.items()):
        if len(found) > 1:
            problems.append(f"{name}: {len(found)} versions ({', '.join(found)}); keep one")
    if "conan-embedding" not in versions:
        problems.append("no conan_embedding wheel")
    total = sum(w.stat().st_size for w in wheels) / MIB
    if total > cap_mib:
        problems.append(f"{total:.1f} MiB of wheels, over the {cap_mib:g} MiB cap")
    return problems, total


def graph(report: dict) -> dict[str, tuple[set[str], set[str]]]:
    """name -> (its dependencies' names on the target, the extras requested of it), from a pip
    ``--report``: markers evaluated for CPython 3.12 on Linux x86_64 with the extras that pip
    resolved (a report entry lists what it was asked for)."""
    items = {norm(i["metadata"]["name"]): i for i in report["install"]}
    extras: dict[str, set[str]] = defaultdict(set)
    for name, item in items.items():
        extras[name] |= {norm(e) for e in item.get("requested_extras") or []}
    edges: dict[str, set[str]] = {}
    changed = True
    while changed:  # extras propagate: a[x] may require b[y]
        changed = False
        for name, item in items.items():
            deps = set()
            for text in item["metadata"].get("requires_dist") or []:
                req = Requirement(text)
                wanted = [""] + sorted(extras[name])
                if req.marker is not None and not any(
                    req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in wanted
                ):
                    continue
                dep = norm(req.name)
                if dep not in items:
                    continue
                deps.add(dep)
                new = {norm(e) for e in req.extras} - extras[dep]
                if new:
                    extras[dep] |= new
                    changed = True
            edges[name] = deps
    return {name: (edges[name], extras[name]) for name in items}


def reachable(edges: dict[str, tuple[set[str], set[str]]], roots, without=()) -> set[str]:
    """Names reachable from ``roots`` not passing through ``without``."""
    seen, todo = set(), [r for r in roots if r not in without]
    while todo:
        name = todo.pop()
        if name in seen or name not in edges:
            continue
        seen.add(name)
        todo.extend(d for d in edges[name][0] if d not in without)
    return seen


def plan(full: dict, image: dict, with_mteb: bool) -> tuple[dict[str, str], dict[str, str]]:
    """({name: version} to ship, {name: version} left out with mteb) from the two reports."""
    versions = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in full["install"]}
    in_image = {norm(i["metadata"]["name"]) for i in image["install"]}
    edges = graph(full)
    keep = reachable(edges, ["conan-embedding"], without=() if with_mteb else (EVAL_ROOT,))
    needed = reachable(edges, ["conan-embedding"]) - (in_image - OLDER_IMAGES)
    left_out = {n: versions[n] for n in sorted(needed - keep)}
    ship = {
        n: versions[n]
        for n in sorted(keep)
        if n == "conan-embedding" or n not in in_image or n in OLDER_IMAGES
    }
    return ship, left_out


def pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    args += ["--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(requirements: list[str], constraints: Path, work: Path, label: str) -> dict:
    report = work / f"{label}.json"
    pip(
        "install",
        "--quiet",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
        "--target",
        str(work / "target"),
        *target_args(),
        "-c",
        str(constraints),
        *requirements,
    )
    return json.loads(report.read_text())


def build(out: Path, with_mteb: bool, cap_mib: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        work = Path(tmp)
        stage = work / "stage"
        stage.mkdir()
        pip("wheel", "--quiet", "--no-deps", str(ROOT), "-w", str(stage))
        (ours,) = stage.glob("conan_embedding-*.whl")
        constraints = work / "constraints.txt"
        pins = {**PINS, **IMAGE}
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
        image_reqs = [f"{n}=={v}" for n, v in IMAGE.items()]
        image = resolve(image_reqs, constraints, work, "image")
        full = resolve([f"{ours}[{','.join(EXTRAS)}]", *image_reqs], constraints, work, "full")
        ship, left_out = plan(full, image, with_mteb)
        downloads = [f"{n}=={v}" for n, v in ship.items() if n != "conan-embedding"]
        pip("download", "--quiet", "--no-deps", *target_args(), "-d", str(stage), *downloads)
        problems, total = check_dir(stage, cap_mib)
        sizes = sorted(stage.glob("*.whl"), key=lambda w: -w.stat().st_size)
        lines = [f"{w.stat().st_size / MIB:8.2f} MiB  {w.name}" for w in sizes]
        lines.append(f"{total:8.2f} MiB  total, {len(sizes)} wheels (cap {cap_mib:g} MiB)")
        if left_out:
            lines.append(
                "left out (only mteb needs them; gpu_check runs no MTEB evaluation; "
                "--with-mteb ships them): " + ", ".join(f"{n}=={v}" for n, v in left_out.items())
            )
        print("\n".join(lines))
        if problems:
            print("gpu_wheels: FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        for old in out.glob("*.whl"):
            old.unlink()
        for wheel in sizes:
            shutil.move(str(wheel), out / wheel.name)
        (out / "MANIFEST.txt").write_text(
            f"# scripts/gpu_wheels.py: CPython {PYTHON_VERSION}, manylinux x86_64; "
            f"install with: bash scripts/gpu_check.sh --wheels {out}\n" + "\n".join(lines) + "\n"
        )
    print(f"gpu_wheels: {len(sizes)} wheels, {total:.2f} MiB in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="where the wheels go (its *.whl are replaced)")
    parser.add_argument("--with-mteb", action="store_true", help="also ship mteb and its subtree")
    parser.add_argument("--max-mib", type=float, default=None, help="size cap (default 60)")
    parser.add_argument(
        "--check-only", action="store_true", help="only check DIR (versions, size); no network"
    )
    args = parser.parse_args(argv)
    cap = args.max_mib or (CAP_MIB_WITH_MTEB if args.with_mteb else CAP_MIB)
    if args.check_only:
        problems, total = check_dir(args.dir, cap)
        print(f"{args.dir}: {total:.2f} MiB of wheels (cap {cap:g} MiB)")
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 1 if problems else 0
    os.environ.setdefault("PIP_DEFAULT_TIMEOUT", "60")
    return build(args.dir.resolve(), args.with_mteb, cap)


if __name__ == "__main__":
    sys.exit(main())
