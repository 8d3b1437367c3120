"""The deployment files in docker/, checked without a docker engine (none runs on these machines).

Nothing here builds an image or starts a container (`make test-compose` does, scripts/test-compose.sh).
Instead: compose.yaml is read as compose reads it (YAML, `extends` of services.yaml, then
`${VAR:-default}` interpolation with the defaults it declares); its commands go through the real
`align-serve` and `align-train` parsers; the server's healthcheck runs for real against a real
align-serve holding an API key; the entrypoint runs for real on a secret file; the Dockerfiles are
checked for pinned bases, a non-root user, dependency layers before source, no secrets, the build
options of docs/deployment.md, and commands that name the project's console scripts. Where a compose
CLI is installed (v2, or v1 1.29), `compose config` must agree with all of that.
"""

import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import yaml

from tests.utils import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
REPLICAS = DOCKER / "compose.replicas.yaml"
SERVICES = DOCKER / "services.yaml"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SECRET_WORDS = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
# The build options of docs/deployment.md, for mirrors, proxies and offline hosts; pip's own defaults
# (PyPI) stand when they are not given.
PIP_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST")


# ---- reading compose files as compose does ----------------------------------------------------

class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags (`!override` replaces instead of merging, `!reset` clears)."""


ComposeLoader.add_constructor("!override", lambda loader, node: _construct(loader, node))
ComposeLoader.add_constructor("!reset", lambda loader, node: _construct(loader, node))


def _construct(loader, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation on every string of a loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        unset = name not in env or (op is not None and op.startswith(":") and env[name] == "")
        if op and op.endswith("?") and unset:
            raise AssertionError(f"compose needs ${name}: {arg}")
        return arg if op and op.endswith("-") and unset else env.get(name, "")

    return _VAR.sub(sub, value)


def load(path: Path, env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.load(path.read_text(), Loader=ComposeLoader), env or {})


# What an override file may set on a service the base file declares: compose v2 and v1 both replace
# `command` and add to `depends_on`; the lists they merge (ports, devices) differ between them.
OVERRIDABLE = {"command", "depends_on"}


def resolve(path: Path, env: dict[str, str] | None = None) -> dict:
    """A compose file with each service's `extends` applied. An extending service may only add keys its
    template lacks: then no merge rule is relied on, and compose v1 and v2 read it alike."""
    config = load(path, env)
    for name, service in config["services"].items():
        if (ext := service.pop("extends", None)) is not None:
            template = load(path.parent / ext["file"], env)["services"][ext["service"]]
            both = set(template) & set(service)
            assert not both, f"{path.name}: {name} sets {sorted(both)}, which its template {ext['service']} has"
            config["services"][name] = {**template, **service}
    return config


def merge(base: dict, override: dict) -> dict:
    """compose -f base -f override, for what override files here set."""
    services = dict(base["services"])
    for name, service in override["services"].items():
        if name in services:
            assert set(service) <= OVERRIDABLE, f"override of {name} sets {sorted(set(service) - OVERRIDABLE)}"
            services[name] = {**services[name], "command": service.get("command", services[name].get("command")),
                              "depends_on": {**services[name].get("depends_on", {}), **service.get("depends_on", {})}}
        else:
            services[name] = service
    return {**base, "services": services}


@pytest.fixture(scope="module")
def compose() -> dict:
    return resolve(COMPOSE)


@pytest.fixture(scope="module")
def replicas(compose) -> dict:
    return merge(compose, resolve(REPLICAS))


@pytest.fixture(scope="module")
def raw() -> dict:
    """compose.yaml before interpolation: which settings are env-driven."""
    return yaml.load(COMPOSE.read_text(), Loader=ComposeLoader)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) for short-syntax volumes."""
    out = {}
    for v in service["volumes"]:
        source, target, *mode = v.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


# ---- Dockerfiles --------------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    return [(s.split(None, 1)[0].upper(), s.split(None, 1)[1] if " " in s.strip() else "") for s in lines]


def run_mounts(args: str) -> tuple[list[dict[str, str]], str]:
    """A RUN's --mount options (as dicts) and the command after them."""
    found = []
    while (m := re.match(r"\s*--mount=(\S+)", args)):
        found.append(dict(kv.split("=", 1) if "=" in kv else (kv, "true") for kv in m.group(1).split(",")))
        args = args[m.end():]
    return found, args


def arg_defaults(dockerfile: Path) -> dict[str, str | None]:
    return {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else None)
            for op, a in instructions(dockerfile) if op == "ARG"}


def exec_form(args: str) -> list[str]:
    form = json.loads(args)
    assert isinstance(form, list) and form, f"use the exec (JSON list) form, not {args!r}: signals reach the process"
    return form


def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.server", "Dockerfile.trainer", "Dockerfile.cpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_image_is_pinned(dockerfile):
    froms = [args.split()[0] for op, args in instructions(dockerfile) if op == "FROM"]
    assert froms == ["${BASE_IMAGE}"], f"{dockerfile.name}: FROM ${{BASE_IMAGE}}, a build argument (a mirror's copy)"
    bases = [arg_defaults(dockerfile)["BASE_IMAGE"]]
    for base in bases:
        name, _, tag = base.partition(":")
        assert tag and tag != "latest", f"{dockerfile.name}: base {base!r} must name an exact tag"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{dockerfile.name}: {base!r}: pin a full x.y.z version, not a moving tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root(dockerfile):
    users = [args.strip() for op, args in instructions(dockerfile) if op == "USER"]
    assert users, f"{dockerfile.name} has no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} ends as USER {users[-1]}"
    created = " ".join(args for op, args in instructions(dockerfile) if op == "RUN")
    assert re.search(rf"useradd .*\b{users[-1]}\b", created), f"{dockerfile.name} never creates {users[-1]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_carries_no_secret(dockerfile):
    for op, args in instructions(dockerfile):
        if op in ("ARG", "ENV"):
            names = re.findall(r"(\w+)=", args) or [args.split()[0]]
            leaked = [n for n in names if SECRET_WORDS.search(n)]
            assert not leaked, f"{dockerfile.name}: {op} {leaked} would bake a secret into the image"
    assert "ALIGN_API_KEY" not in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_dependencies_before_source(dockerfile):
    """The dependency step reads pyproject.toml and the install script alone, so a code change does not
    reinstall torch; the project comes after, from the context as pip builds it, needing no index."""
    steps = instructions(dockerfile)
    runs = [(i, *run_mounts(args)) for i, (op, args) in enumerate(steps) if op == "RUN"]
    deps = next(i for i, _, command in runs if re.search(r"install-deps\.sh [^&]*-r ", command))
    project = [(i, mounts, command) for i, mounts, command in runs if "pip install --no-deps" in command]
    assert len(project) == 1 and deps < project[0][0], f"{dockerfile.name}: dependencies first, then the project"
    assert not any(op == "COPY" for op, _ in steps[:deps]), f"{dockerfile.name}: a COPY before the dependencies"
    for i, mounts, _ in runs:
        sources = sorted(m.get("source", ".") for m in mounts if m.get("type") == "bind")
        if i <= deps:
            assert "." not in sources, f"{dockerfile.name}: step {i} reads the whole context before the dependencies"
        if i == deps:
            assert sources == ["pyproject.toml", "scripts/install-deps.sh"], sources
    _, mounts, command = project[0]
    context = [m["target"] for m in mounts if m.get("type") == "bind" and m.get("source", ".") == "."]
    assert context and re.search(rf"pip install --no-deps --no-build-isolation --no-index {context[0]}\b", command), (
        f"{dockerfile.name}: install the project from the mounted context, offline (the build backend came with the "
        "dependencies)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_takes_torch_as_make_install_does(dockerfile):
    """One script picks torch's build and source for `make install` and every image (docs/install.md)."""
    extra = "cpu" if dockerfile.name == "Dockerfile.cpu" else "gpu"
    runs = [args for op, args in instructions(dockerfile) if op == "RUN"]
    assert any(re.search(rf"install-deps\.sh python {extra} -r ", run) for run in runs), (
        f"{dockerfile.name}: install the dependencies by scripts/install-deps.sh python {extra}")
    assert not any("torch==" in run or "download.pytorch.org" in run for run in runs), (
        f"{dockerfile.name}: torch's version and index live in scripts/install-deps.sh alone")
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install-deps.sh" in makefile and "$(INSTALL_DEPS) $(PY) $(EXTRA) " in makefile
    if extra == "cpu":  # the build arg's default is the script's
        default = re.search(r"TORCH_INDEX:-([^}]+)\}", (ROOT / "scripts" / "install-deps.sh").read_text()).group(1)
        assert ("ARG", f"TORCH_INDEX={default}") in instructions(dockerfile)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_build_options_for_mirrors_and_custom_cas(dockerfile):
    """pip's index settings are build arguments without a default (PyPI stands), declared by every image;
    each step that reaches an index trusts the CA bundle of the build secret pip_ca when one is given,
    for that step only (a secret never lands in a layer, unlike a build argument)."""
    defaults = arg_defaults(dockerfile)
    for name in PIP_ARGS:
        assert name in defaults and defaults[name] is None, f"{dockerfile.name}: ARG {name} (no default)"
    assert "ENV PIP_CERT" not in dockerfile.read_text() and "PIP_CERT" not in " ".join(
        a for op, a in instructions(dockerfile) if op == "ENV")
    for op, args in instructions(dockerfile):
        mounts, command = run_mounts(args)
        if op == "RUN" and re.search(r"install-deps\.sh|pip install -r", command):
            assert {"type": "secret", "id": "pip_ca"} in mounts, f"{dockerfile.name}: {command[:60]}...: mount pip_ca"
            assert command.strip().startswith(
                "if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi"), command[:80]
            assert any(m.get("type") == "cache" and m["target"] == "/var/cache/pip" for m in mounts)
            assert "PIP_CACHE_DIR=/var/cache/pip" in command, "pip's cache in the cache mount, not in a layer"
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for option in ("BASE_IMAGE", "TORCH_INDEX", *PIP_ARGS, "id=pip_ca"):
        assert option in docs, f"docs/deployment.md does not document the build option {option}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_command_names_a_console_script(dockerfile):
    steps = instructions(dockerfile)
    entrypoint = [exec_form(args) for op, args in steps if op == "ENTRYPOINT"]
    cmd = [exec_form(args) for op, args in steps if op == "CMD"]
    assert entrypoint == [["/usr/local/bin/align-entrypoint"]]
    assert "docker/entrypoint.sh /usr/local/bin/align-entrypoint" in " ".join(a for op, a in steps if op == "COPY")
    assert len(cmd) == 1 and cmd[0][0] in SCRIPTS, (
        f"{dockerfile.name}: CMD {cmd} must start with a console script of pyproject's [project.scripts] "
        f"({sorted(SCRIPTS)})")
    if cmd[0][0] == "align-serve":
        from server.cli import build_parser

        build_parser().parse_args(cmd[0][1:])
        assert ("EXPOSE", "8000") in steps


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_the_context_holds(dockerfile):
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for op, args in instructions(dockerfile):
        if op == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
        elif op == "RUN":
            sources = [m.get("source", ".") for m in run_mounts(args)[0] if m.get("type") == "bind"]
        else:
            continue
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repository"
            assert not any(fnmatch(src, pat) for pat in ignored), f"{dockerfile.name}: COPY {src} is in .dockerignore"


def test_dockerignore_keeps_secrets_and_environments_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "docker/secrets", ".env", "outputs", "models", "data"} <= ignored


def test_entrypoint_exports_the_key_from_the_secret_file(tmp_path):
    secret = tmp_path / "align_api_key"
    secret.write_text("s3cret\n")
    show = ["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", 'printf %s "$ALIGN_API_KEY"']
    env = {"PATH": "/usr/bin:/bin", "ALIGN_API_KEY_FILE": str(secret)}
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout == "s3cret"
    missing = subprocess.run(show, env={**env, "ALIGN_API_KEY_FILE": str(tmp_path / "absent")},
                             capture_output=True, text=True)
    assert missing.returncode == 64 and "not a readable file" in missing.stderr
    unset = subprocess.run(show, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    assert unset.stdout == ""


# ---- compose.yaml ---------------------------------------------------------------------------------

def test_compose_services_profiles_and_images(compose):
    services = compose["services"]
    profiles = {name: service["profiles"] for name, service in services.items()}
    assert profiles == {"server": ["gpu"], "trainer": ["gpu"], "cpu-server": ["cpu"], "cpu-trainer": ["cpu"],
                        "demo": ["demo"]}
    for name, service in services.items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: build from the repository root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest", f"{name}: tag the image ({service['image']!r})"


@pytest.mark.parametrize(("name", "engine"), [("server", "vllm"), ("cpu-server", "transformers")])
def test_server_command_parses_with_align_serve(compose, name, engine):
    from server.cli import build_parser

    command = compose["services"][name]["command"]
    assert command[0] == "align-serve" and "align-serve" in SCRIPTS
    args = build_parser().parse_args(command[1:])
    assert args.engine == engine and args.host == "0.0.0.0" and args.port == 8000
    assert args.tensor_parallel_size == 1 and args.model.startswith("/models/")
    assert args.api_key is None, "the key comes from the secret (ALIGN_API_KEY), never the command line"


def check_trainer_command(command: list[str], services: dict):
    """The trainer's command through align-train's parser; (its arguments, its TRL config)."""
    from trainer_client.config import parse_args

    assert command[0] == "align-train"
    assert "align-train" in SCRIPTS, "pyproject.toml's [project.scripts] has no align-train"
    _, align, config, _ = parse_args(command[1:])
    assert config.vllm_mode == "server" and align.api_key is None
    for url in align.server_url:
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", url).groups()
        assert host in services, f"--server-url {url}: no service {host!r}"
        assert port == "8000", f"--server-url {url}: align-serve listens on 8000 inside its container"
    assert config.output_dir.startswith("/outputs/") and align.model.startswith("/models/")
    assert align.dataset.startswith("/data/")
    return align, config


def test_trainer_command_parses_with_align_train(compose):
    check_trainer_command(compose["services"]["trainer"]["command"], compose["services"])


def test_cpu_trainer_runs_a_short_run_against_the_cpu_server(compose, raw):
    align, config = check_trainer_command(compose["services"]["cpu-trainer"]["command"], compose["services"])
    assert align.server_url == ["http://cpu-server:8000"]
    assert config.max_steps == 3 and "--max_steps=${ALIGN_MAX_STEPS:-3}" in raw["services"]["cpu-trainer"]["command"]
    assert config.per_device_train_batch_size % config.num_generations == 0
    transport = load(COMPOSE, {"ALIGN_WEIGHT_TRANSPORT": "tcp"})["services"]["cpu-trainer"]["command"]
    assert "--weight-transport=tcp" in transport


def test_demo_command_is_the_make_demo_module(compose):
    command = compose["services"]["demo"]["command"]
    assert command[:3] == ["python", "-m", "examples.demo"], "the demo profile runs what `make demo` runs"
    assert "examples.demo" in (ROOT / "Makefile").read_text()
    usage = subprocess.run([sys.executable, "-m", "examples.demo", "--help"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for flag in command[3:]:
        assert flag.split("=")[0] in usage, f"python -m examples.demo has no {flag.split('=')[0]}"
    work_dir = command[3].split("=", 1)[1]
    assert work_dir.startswith("/outputs/") and "/outputs" in mounts(compose["services"]["demo"])


def test_trainer_waits_for_a_healthy_server(compose):
    assert compose["services"]["trainer"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert compose["services"]["cpu-trainer"]["depends_on"] == {"cpu-server": {"condition": "service_healthy"}}


def test_gpu_reservations_with_device_ids_from_env(compose, raw):
    for name, var in (("server", "ALIGN_SERVER_GPUS"), ("trainer", "ALIGN_TRAINER_GPUS")):
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        raw_ids = raw["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        assert raw_ids == [f"${{{var}:-{devices[0]['device_ids'][0]}}}"], f"{name}: GPU ids must come from ${var}"
    ids = [compose["services"][n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
           for n in ("server", "trainer")]
    assert ids[0] != ids[1], "by default the server and the trainer get different GPUs"
    for name in ("cpu-server", "cpu-trainer", "demo"):
        assert "deploy" not in compose["services"][name], f"{name} must run without GPUs"


def test_api_key_comes_from_a_secret(compose):
    secret = compose["secrets"]["align_api_key"]
    assert set(secret) == {"file"}
    for name in ("server", "trainer", "cpu-server", "cpu-trainer"):
        service = compose["services"][name]
        assert service["secrets"] == ["align_api_key"]
        env = env_of(service)
        assert env["ALIGN_API_KEY_FILE"] == "/run/secrets/align_api_key"
        assert "ALIGN_API_KEY" not in env, f"{name}: a key in `environment` shows in `docker inspect`"
        assert not any(SECRET_WORDS.search(a) for a in service["build"]["args"]), f"{name}: a secret build arg"


def test_volumes_for_models_cache_and_outputs(compose):
    server, trainer = (mounts(compose["services"][n]) for n in ("server", "trainer"))
    assert server["/models"][1] == "ro" and server["/cache"] == ("cache", "rw")
    assert trainer["/models"][1] == "ro" and trainer["/data"][1] == "ro" and trainer["/outputs"][1] == "rw"
    assert trainer["/cache"] == ("cache", "rw") and "cache" in compose["volumes"]
    assert server["/models"][0] == trainer["/models"][0], "server and trainer must start from the same policy"
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "HF_HOME=/cache/huggingface" in text and "chown align /cache /outputs" in text


def test_only_the_api_port_is_published_on_loopback(compose):
    # http weight sync rides the API port; tcp/nccl open ephemeral ports (gloo, NCCL) and work only
    # inside the compose network, so publishing one fixed "weight port" would promise what it cannot do.
    for name in ("server", "cpu-server"):
        assert [p.split(":") for p in compose["services"][name]["ports"]] == [["127.0.0.1", "8000", "8000"]]
        exposed = load(COMPOSE, {"ALIGN_BIND": "0.0.0.0", "ALIGN_PORT": "9000"})["services"][name]["ports"]
        assert exposed == ["0.0.0.0:9000:8000"]
    assert not any("ports" in s for n, s in compose["services"].items() if "server" not in n)


def test_healthcheck_path_is_a_real_route(compose, tmp_path):
    from server.app import ServeConfig, create_app
    from server.engines import create_engine

    url = re.search(r"'(http://[^']+)'", compose["services"]["server"]["healthcheck"]["test"][-1]).group(1)
    assert httpx.URL(url).path == "/ready"
    # The app as align-serve builds it (the engine loads nothing until started).
    app = create_app(create_engine("transformers", model=str(tmp_path)), ServeConfig(model_name="m", api_key="k"))
    assert "/ready" in {route.path for route in app.routes if "GET" in getattr(route, "methods", ())}


@pytest.mark.timeout(300)
def test_healthcheck_passes_against_a_real_server(compose, tiny_vlm, log_dir, tmp_path):
    """The healthcheck's own command, run against align-serve with an API key: 0 when ready with the
    right key, non-zero with a wrong one (and /ready really needs the key, so it must send it)."""
    check = compose["services"]["server"]["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]
    assert re.fullmatch(r"\d+s", check["interval"]) and re.fullmatch(r"\d+m", check["start_period"])
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    server = ServerProcess(tiny_vlm, "transformers", api_key="s3cret", log_dir=log_dir)
    try:
        server.wait_ready(120)
        code = check["test"][3].replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")

        def healthcheck(key: str) -> int:
            key_file.write_text(key)
            return subprocess.run([sys.executable, "-c", code], env={"ALIGN_API_KEY_FILE": str(key_file)},
                                  capture_output=True, timeout=30).returncode

        assert healthcheck("s3cret\n") == 0
        assert healthcheck("wrong") != 0
        assert httpx.get(f"{server.url}/ready").status_code == 401
    finally:
        server.stop()


# ---- scaling: a second server replica ---------------------------------------------------------------

@pytest.mark.parametrize(("first", "second", "trainer"), [("server", "server-2", "trainer"),
                                                          ("cpu-server", "cpu-server-2", "cpu-trainer")])
def test_replicas_override_adds_a_server_the_trainer_spreads_over(compose, replicas, first, second, trainer):
    services = replicas["services"]
    raw_replicas = yaml.load(REPLICAS.read_text(), Loader=ComposeLoader)["services"]
    assert raw_replicas[second]["extends"] == yaml.load(COMPOSE.read_text(), Loader=ComposeLoader)[
        "services"][first]["extends"], f"{second} is {first}'s template, with its own port (and GPUs)"
    assert services[second]["ports"][0].split(":")[1] != services[first]["ports"][0].split(":")[1]
    assert services[second]["profiles"] == services[first]["profiles"]
    if "deploy" in services[first]:
        ids = [services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in (first, second)]
        assert ids[0] != ids[1], "each replica on its own GPUs"
    align, _ = check_trainer_command(services[trainer]["command"], services)
    assert align.server_url == [f"http://{first}:8000", f"http://{second}:8000"]
    others = [[a for a in s["services"][trainer]["command"] if not a.startswith("--server-url")]
              for s in (compose, replicas)]
    assert others[0] == others[1], f"{trainer}: the override changes the servers alone"
    assert services[trainer]["depends_on"] == {s: {"condition": "service_healthy"} for s in (first, second)}


def test_compose_files_read_on_compose_v1_and_v2(compose):
    """No syntax compose v1 (1.29, Debian 12's) refuses; the project name comes from docker/.env, which
    both read from the first -f file's folder."""
    for path in (COMPOSE, REPLICAS, SERVICES):
        assert not V2_ONLY.search(path.read_text()), f"{path.name}: {V2_ONLY.search(path.read_text()).group(0)}"
    assert "COMPOSE_PROJECT_NAME=vlm-align" in (DOCKER / ".env").read_text().splitlines()


# ---- the compose CLI itself, where the plugin is installed --------------------------------------

def _compose_cli() -> tuple[list[str], str] | None:
    """The compose CLI here and its version: the v2 plugin (`docker compose`) or v1's `docker-compose`
    (1.29, what Debian 12 and Ubuntu 22.04 ship), which reads files differently and prints YAML."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        try:
            done = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and re.fullmatch(r"v?\d+\.\d+\.\d+\S*", done.stdout.strip()):
            return cli, done.stdout.strip().removeprefix("v")
    return None


# What compose v1 refuses outright: a top-level `name:` and the merge tags of the compose spec.
V2_ONLY = re.compile(r"^name:|!override|!reset", re.MULTILINE)


def test_docker_compose_config_agrees(compose, tmp_path):
    found = _compose_cli()
    if found is None:
        pytest.skip("no docker compose (v2 plugin or v1) here: `config` not run; the PyYAML checks above ran")
    cli, version = found
    v1 = version.startswith("1.")
    if v1 and (v2_only := sorted({m.group(0) for f in (COMPOSE, REPLICAS) for m in V2_ONLY.finditer(f.read_text())})):
        pytest.skip(f"compose {version} (v1) cannot read {', '.join(v2_only)} in docker/: `config` not run")
    secret = tmp_path / "key"
    secret.write_text("k")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "ALIGN_API_KEY_SECRET": str(secret)}
    for files in ([COMPOSE], [COMPOSE, REPLICAS]):
        args = [*cli, *sum((["-f", str(f)] for f in files), []), "--profile", "gpu", "--profile", "cpu",
                "--profile", "demo", "config",
                *([] if v1 else ["--format", "json"])]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{shlex.join(args)}:\n{done.stderr}"
        services = (yaml.safe_load(done.stdout) if v1 else json.loads(done.stdout))["services"]
        expected = resolve(COMPOSE) if files == [COMPOSE] else merge(resolve(COMPOSE), resolve(REPLICAS))
        assert set(services) == set(expected["services"])
        for name, service in expected["services"].items():
            assert services[name]["command"] == service["command"], name
            for on, condition in service.get("depends_on", {}).items():
                assert services[name]["depends_on"][on] == condition, (name, on)


def test_every_service_running_a_server_has_room_in_dev_shm(compose):
    # weight syncs are staged in /dev/shm (model-sized); docker's default there is 64 MB
    for name in ("server", "cpu-server", "demo"):
        service = compose["services"][name]
        assert service.get("ipc") == "host" or service.get("shm_size") == "2gb", name


def test_cpu_stack_shares_one_dev_shm(compose, replicas):
    """--weight-transport=shm across containers: the trainer and the second replica join the CPU
    server's IPC namespace (its /dev/shm); the host's stays out of it."""
    assert compose["services"]["cpu-server"]["ipc"] == "shareable"
    for name in ("cpu-trainer", "cpu-server-2"):
        assert replicas["services"][name]["ipc"] == "service:cpu-server", name
