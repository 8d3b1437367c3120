"""What each image installs of the project, checked without docker: every console script must import
from it alone.

Each Dockerfile's file steps are replayed into a temp folder, against the build context as docker sees
it (the repository less .dockerignore): COPY, RUN's bind mounts of the context, and each `pip install
--no-deps PATH` (the project's own install) through this venv's pip into a folder of its own. The
dependencies' installs are not replayed: this venv stands in for them. Then every entry point of
pyproject's [project.scripts] is imported with that folder and this venv's site-packages as the only
paths (no site processing, so the project's own editable install here cannot fill a gap): a source
folder the image lacks fails here, as it would in the container.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from tests.test_docker import DOCKERFILES, ROOT, instructions, run_mounts

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# pip options that take a value: what follows them is not a path to install
PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-t", "--target", "-i", "--index-url",
                     "--extra-index-url", "-f", "--find-links", "--prefix", "--root", "--cache-dir", "--trusted-host"}


# ---- the build context: the repository less .dockerignore, as docker matches it ----------------------

def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as docker reads it: paths relative to the context root, `*` and `?` within
    one path element, `**` across any number of them."""
    pattern = os.path.normpath(pattern.strip()).lstrip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore(root: Path) -> list[tuple[bool, re.Pattern]]:
    """(exception, pattern) per line of .dockerignore; the last line that matches a path decides."""
    path = root / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    rules = []
    for line in (s.strip() for s in lines):
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _pattern(line.removeprefix("!"))))
    return rules


def ignored(rel: str, rules) -> bool:
    """Excluded when the path or a folder above it matches (a matched folder takes its contents along)."""
    parts = PurePosixPath(rel).parts
    excluded = False
    for exception, pattern in rules:
        if any(pattern.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not exception
    return excluded


def build_context(repo: Path, dest: Path) -> Path:
    rules = dockerignore(repo)
    prune = not any(exception for exception, _ in rules)  # an exception may take back part of a folder
    for folder, dirs, files in os.walk(repo):
        rel_folder = Path(folder).relative_to(repo)
        if prune:
            dirs[:] = [d for d in dirs if not ignored((rel_folder / d).as_posix(), rules)]
        for name in files:
            rel = (rel_folder / name).as_posix()
            if not ignored(rel, rules):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / rel, dest / rel)
    return dest


def test_dockerignore_matching_reads_patterns_as_docker_does():
    rules = [(False, _pattern(p)) for p in ("**/__pycache__", "*.egg-info", "tests", "docker/secrets")]
    assert ignored("server/__pycache__/app.pyc", rules) and ignored("__pycache__/x.pyc", rules)
    assert ignored("vlm_align.egg-info/PKG-INFO", rules) and not ignored("server/x.egg-info/PKG-INFO", rules)
    assert ignored("tests/test_docker.py", rules) and not ignored("server/tests.py", rules)
    assert ignored("docker/secrets/align_api_key", rules) and not ignored("docker/compose.yaml", rules)
    assert not ignored("docker/secrets/x", [*rules, (True, _pattern("docker/secrets/x"))])


# ---- replaying a Dockerfile's file steps -----------------------------------------------------------

def _in_root(root: Path, cwd: PurePosixPath, path: str) -> Path:
    return root / (cwd / path).as_posix().lstrip("/")


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _project_installs(command: str) -> list[str]:
    """The paths of each `pip install --no-deps PATH...` in a shell command."""
    paths = []
    for m in re.finditer(r"pip install ([^&;|]*)", command):
        tokens = shlex.split(m.group(1))
        if "--no-deps" not in tokens:
            continue
        skip = False
        for token in tokens:
            if skip:
                skip = False
            elif token in PIP_VALUE_OPTIONS:
                skip = True
            elif not token.startswith("-"):
                paths.append(token)
    return paths


def replay(dockerfile: Path, context: Path, root: Path) -> list[Path]:
    """The image's files in `root` (as far as COPY and the project's own pip install make them); the
    folders the project was installed into, one per install."""
    steps = instructions(dockerfile)
    if [op for op, _ in steps].count("FROM") != 1:
        pytest.fail(f"{dockerfile.name}: several stages; this check reads one")
    cwd, installed = PurePosixPath("/"), []
    for op, args in steps:
        if op == "WORKDIR":
            cwd = cwd / args.strip()
        elif op == "COPY":
            tokens = args.split()
            if any(t.startswith("--from") for t in tokens):
                pytest.fail(f"{dockerfile.name}: COPY --from: this check reads one stage")
            *sources, dest = [t for t in tokens if not t.startswith("--")]
            for src in sources:
                assert (context / src).exists(), f"{dockerfile.name}: COPY {src}: not in the build context"
                target = _in_root(root, cwd, dest)
                if (context / src).is_file() and (dest.endswith("/") or len(sources) > 1 or target.is_dir()):
                    target = target / Path(src).name
                _copy(context / src, target)
        elif op == "RUN":
            mounts, command = run_mounts(args)
            binds = [m for m in mounts if m.get("type") == "bind"]
            assert not any("from" in m for m in binds), f"{dockerfile.name}: a bind mount from another stage"
            targets = []
            for bind in binds:
                src = context / bind.get("source", bind.get("src", "."))
                assert src.exists(), f"{dockerfile.name}: RUN --mount of {bind.get('source')}: not in the build context"
                targets.append(_in_root(root, cwd, bind.get("target", bind.get("dst", bind.get("destination")))))
                _copy(src, targets[-1])
            for path in _project_installs(command):
                site = root.parent / f"site-{len(installed)}"
                done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                       "--no-build-isolation", "--no-index", "--target", str(site),
                                       str(_in_root(root, cwd, path))], capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, (f"{dockerfile.name}: its `pip install --no-deps {path}` fails:\n"
                                              f"{done.stderr[-3000:]}")
                installed.append(site)
            for target in targets:  # a mount is gone after its RUN
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    return installed


IMPORT_ENTRY_POINTS = """
import importlib, json, sys
site, scripts, failed = sys.argv[1], json.loads(sys.argv[2]), {}
for name, target in scripts.items():
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        failed[name] = f"{target}: {type(exc).__name__}: {exc}"
        continue
    if not sys.modules[module].__file__.startswith(site):
        failed[name] = f"{module} came from {sys.modules[module].__file__}, not from the image's install"
print(json.dumps(failed))
"""


def digest(site: Path) -> str:
    """What an install put in `site`, less its install records (they name the folder it came from)."""
    h = hashlib.sha256()
    files = (p for p in site.rglob("*") if p.is_file() and p.suffix != ".pyc" and ".dist-info" not in p.parent.name)
    for path in sorted(files):
        h.update(path.relative_to(site).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


IMPORTED: dict[str, dict[str, str]] = {}  # digest -> import_entry_points' answer: the images install alike


def import_entry_points(site: Path, workdir: Path) -> dict[str, str]:
    """Console script -> why it does not import, with only `site` and this venv's site-packages on the path."""
    if (key := digest(site)) in IMPORTED:
        return IMPORTED[key]
    paths = [str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
           "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    done = subprocess.run([sys.executable, "-S", "-c", IMPORT_ENTRY_POINTS, str(site), json.dumps(SCRIPTS)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    IMPORTED[key] = json.loads(done.stdout.strip().splitlines()[-1])
    return IMPORTED[key]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Path:
    return build_context(ROOT, tmp_path_factory.mktemp("context"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_install_runs_every_console_script(dockerfile, context, tmp_path):
    installed = replay(dockerfile, context, tmp_path / "root")
    assert installed, f"{dockerfile.name} never runs `pip install --no-deps` on the project"
    for site in installed:
        failed = import_entry_points(site, tmp_path)
        assert not failed, f"{dockerfile.name}: console scripts that cannot start in the image:\n" + "\n".join(
            f"  {name}: {why}" for name, why in failed.items())
