"""The documentation: the site builds strictly, and every command its pages show runs.

A shell block (```bash) is run by ``test_the_commands_of_each_page_run`` in a workspace that looks
like a clone of the repository (gin/, launch/, docs/... linked in), on tiny settings: `segtrain
train` and `segtrain doctor` get ``TINY_SETTINGS`` appended, and ``/data/`` is the workspace's
``data/``, where the raw datasets the pages prepare are fabricated in their real formats. A block
that cannot run here says so in an HTML comment on the line before it:

    <!-- docs: needs a cluster -->      (also: needs a GPU, needs Docker, needs the internet)  not run
    <!-- docs: runs a server -->        started on a free port, stopped once it listens
    <!-- docs: a benchmark -->          each script's --help (the measurement takes minutes)
    <!-- docs: run by tests/test_launch.py::test_name -->   that test runs it; it must exist

The set-up steps (venv, activate, `pip install -e ".[extra]"`) are checked, not run: each extra
exists, and the test command is the one `.ci/run` runs.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import html
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, TINY, segtrain_main

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/pages/**/*.md", recursive=True))
SHELL = ("bash", "sh", "shell", "console")
NEEDS = ("needs a cluster", "needs a GPU", "needs Docker", "needs the internet")
RUN_MARKS = ("runs a server", "a benchmark")  # marked blocks that are run here all the same
MARK = re.compile(r"<!-- docs: (.+?) -->")
# The experiment's own model (the pages name its layers) and dataset, trained for a moment on small crops.
TINY_SETTINGS = [b for b in TINY if not b.startswith(("train.model", "models."))] + [
    "train.num_steps = 2", "train.eval_every = 2", "train.steps_per_loop = 2", "train.batch_size = 2",
    "train.eval_batch_size = 2", "train.num_image_panels = 0", "learning_rate.warmup_steps = 0"]
RUNNABLE = ("python3.11", ".", "source", "pip", "python", "segtrain", "saved_model_cli")
LINKED = ["gin", "launch", "docs", "examples", "benchmarks", "setup.cfg", "registry", "segtrain"]


@dataclasses.dataclass
class Block:
    page: str
    line: int
    lang: str
    mark: str | None
    text: str

    def __str__(self):
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    lines = open(os.path.join(REPO, page)).read().split("\n")
    found, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            indent = lines[i].index("`")
            start, lang = i, stripped[3:].strip()
            i += 1
            while not lines[i].strip().startswith("```"):
                i += 1
            previous = lines[start - 1].strip() if start else ""
            mark = MARK.fullmatch(previous)
            found.append(Block(page, start + 1, lang, mark.group(1) if mark else None,
                               "\n".join(line[indent:] for line in lines[start + 1:i])))
        i += 1
    return found


def commands(block: Block) -> list[list[list[str]]]:
    """The block's commands, each a list of `&&`-joined simple commands (token lists)."""
    out, pending = [], ""
    for line in block.text.split("\n"):
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        try:
            tokens = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        pending = ""
        if tokens:
            chain = [[]]
            for token in tokens:
                if token == "&&":
                    chain.append([])
                else:
                    chain[-1].append(token)
            out.append(chain)
    assert not pending.strip(), f"{block}: unterminated command {pending!r}"
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_code_block_names_its_language():
    """An unnamed block could hide a shell command from the checks below."""
    assert [str(b) for b in ALL if not b.lang] == []


def test_every_shell_block_is_run_or_says_why_not():
    known = NEEDS + RUN_MARKS
    for block in ALL:
        if block.lang not in SHELL:
            continue
        if block.mark is None:  # run here: only what the runner knows how to run
            for chain in commands(block):
                for simple in chain:
                    assert simple[0] in RUNNABLE and (simple[0] != "pip" or simple[:3] == ["pip", "install", "-e"]), (
                        f"{block}: {shlex.join(simple)!r} cannot run here: mark the block")
        elif block.mark.startswith("run by "):
            path, _, name = block.mark[len("run by "):].partition("::")
            source = open(os.path.join(REPO, path)).read()
            assert f"def {name}(" in source, f"{block}: no test {block.mark[7:]}"
            for chain in commands(block):
                for simple in chain:
                    script = simple[1] if simple[0] in ("python", "bash") else simple[-1] if simple[0] == "pip" else simple[0]
                    assert os.path.basename(script.rstrip("/")) in source, f"{block}: {path}::{name} does not run {script}"
        else:
            assert block.mark in known, f"{block}: unknown mark {block.mark!r} (known: {known}, 'run by ...')"


def test_the_setup_steps_name_real_extras_and_the_test_command_is_ci():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    extras = set(config["options.extras_require"])
    ci = open(os.path.join(REPO, ".ci/run")).read()
    seen = 0
    for block in ALL:
        if block.lang not in SHELL:
            continue
        for chain in commands(block):
            for simple in chain:
                if simple[:3] == ["pip", "install", "-e"]:
                    named = re.fullmatch(r"\.\[([\w,-]+)\]", simple[3]).group(1).split(",")
                    assert set(named) <= extras, f"{block}: no extra {set(named) - extras}"
                    seen += 1
            if chain[-1] == ["python", "-m", "pytest"]:
                assert block.text.strip() in ci, f"{block}: .ci/run does not run {block.text.strip()!r}"
    assert seen >= 3


def test_the_site_builds_strictly(tmp_path):
    """Broken links, anchors, missing pages, snippets and docstring references all fail the build."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml",
                             "--site-dir", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stderr[-5000:]
    def text(page):
        return html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "site" / page / "index.html").read_text()))

    # The loop is included from segtrain/train/loop.py, not copied; the reference is made from docstrings.
    assert "train_window = action.around(train_window)" in text("architecture")
    assert open(os.path.join(REPO, "gin/quickstart.gin")).read().strip() in text("configuration")
    assert "The actions of a run, in the order the loop calls them" in text("reference/training")


def test_the_configuration_page_names_every_setting_of_the_run_pipeline_inference_and_strategy():
    """The gin surface table cannot miss a setting: each field of the scopes segtrain owns is named."""
    import inspect

    from segtrain.data.pipeline import PipelineConfig
    from segtrain.experiment import ExperimentConfig, inference_options
    from segtrain.runtime.distribute import build_strategy

    page = open(os.path.join(REPO, "docs/pages/configuration.md")).read()
    names = [f"train.{f.name}" for f in dataclasses.fields(ExperimentConfig)]
    names += [f"pipeline.{f.name}" for f in dataclasses.fields(PipelineConfig)]
    names += [f"inference.{p}" for p in inspect.signature(inference_options).parameters]
    names += [f"distribute.{p}" for p in inspect.signature(build_strategy).parameters]
    assert [n for n in names if f"`{n}`" not in page] == []


def test_the_layout_names_every_module():
    page = open(os.path.join(REPO, "docs/pages/architecture.md")).read()
    layout = page.split("## Layout")[1].split("```text")[1].split("```")[0]
    words = set(re.findall(r"\w+", layout))
    modules = {os.path.basename(p)[:-3] for p in glob.glob(f"{REPO}/segtrain/**/*.py", recursive=True)}
    assert sorted(modules - words - {"__init__"}) == []


# ----- running the pages' commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A clone-like directory: the repository's files linked in, runs/ and the raw datasets real."""
    from tests.data import fabricate

    ws = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        os.symlink(os.path.join(REPO, name), ws / name)
    data = ws / "data"
    fabricate.voc(str(data))
    fabricate.sbd(str(data), ["2008_000002", "2008_000003", "2008_000004", "2008_000005"], voc_root=str(data))
    fabricate.folder(str(data / "my_photos"), [f"photo{i:02d}" for i in range(30)], num_classes=3)
    fabricate.folder_multilabel(str(data / "my_cells"), [f"cell{i:02d}" for i in range(12)], "channels", labels=("cell",))
    fabricate.folder_bands(str(data / "my_scenes"), [f"scene{i:02d}" for i in range(12)], channels=4)
    fabricate.cityscapes(str(data / "cityscapes"))
    fabricate.ade20k(str(data))
    fabricate.coco_stuff(str(data / "cocostuff"))
    fabricate.drive(str(data))
    return ws


def runs_here(block: Block) -> bool:
    return block.lang in SHELL and (block.mark is None or block.mark in RUN_MARKS)


def _pages_with_commands():
    return [p for p in PAGES if any(runs_here(b) for b in ALL if b.page == p)]


class Runner:
    def __init__(self, ws):
        self.ws = ws
        self.done: set[str] = set()

    def run_block(self, block: Block) -> None:
        for chain in commands(block):
            for simple in chain:
                self.run(block, [t.replace("/data/", f"{self.ws}/data/") for t in simple])

    def run(self, block: Block, argv: list[str]) -> None:
        key = shlex.join(argv)
        if key in self.done:
            return
        where = f"{block}: {key}"
        program = argv[0]
        if program in ("python3.11", ".", "source") or argv[:2] == ["pip", "install"]:
            return  # the set-up: checked by test_the_setup_steps_name_real_extras_and_the_test_command_is_ci
        if argv == ["python", "-m", "pytest"]:
            return  # the suite itself
        if block.mark == "a benchmark":
            self.process(where, [sys.executable if program == "python" else program, *argv[1:], "--help"])
        elif block.mark == "runs a server":
            self.server(where, argv)
        elif program == "segtrain":
            self.segtrain(where, argv[1:])
        elif program == "python":
            self.process(where, [sys.executable, *argv[1:]])
        elif program == "saved_model_cli":
            self.process(where, [os.path.join(os.path.dirname(sys.executable), program), *argv[1:]])
        else:
            raise AssertionError(f"{where}: the docs test cannot run {program!r}; run it or mark the block")
        self.done.add(key)

    def segtrain(self, where: str, args: list[str]) -> None:
        if args[0] in ("train", "doctor", "tune"):
            args = args + [f"--gin_param={b}" for b in TINY_SETTINGS]
        if args[0] == "tune":  # one trial shows the study end to end (tests/test_tune.py runs more)
            args = [a for a in args if not a.startswith("--num_trials")] + ["--num_trials=1"]
        if any(a.startswith("--cpu_replicas") for a in args):  # logical devices: a process of its own
            self.process(where, [sys.executable, "-m", "segtrain.cli", *args])
            return
        cwd = os.getcwd()
        os.chdir(self.ws)
        try:
            result = segtrain_main(*args)
        finally:
            os.chdir(cwd)
        assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"

    def process(self, where: str, argv: list[str]) -> None:
        result = subprocess.run(argv, cwd=self.ws, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"

    def server(self, where: str, argv: list[str]) -> None:
        """Starts the server, waits until it says where it listens, stops it."""
        program = os.path.join(os.path.dirname(sys.executable), argv[0])
        port = {"tensorboard": ["--port={}"], "mkdocs": ["--dev-addr=127.0.0.1:{}"]}.get(argv[0], [])
        with socket.socket() as s:  # a free port, so that a server already running here does not matter
            s.bind(("127.0.0.1", 0))
            port = [p.format(s.getsockname()[1]) for p in port]
        process = subprocess.Popen([program, *argv[1:], *port], cwd=self.ws, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                   env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if re.search(r"https?://(localhost|127\.0\.0\.1)", "".join(lines)):
                    return
                time.sleep(0.2)
            raise AssertionError(f"{where}: the server did not start\n{''.join(lines)[-3000:]}")
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def runner(workspace):
    return Runner(workspace)


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_commands())
def test_the_commands_of_each_page_run(page, runner):
    """Every command of the page, in its order, on tiny settings; the quickstart's run (README
    first) is the one the later pages use."""
    if page != "README.md" and "README.md" in PAGES:
        for block in blocks("README.md"):  # the quickstart run the pages read (run once)
            if block.lang in SHELL and block.mark is None:
                runner.run_block(block)
    for block in blocks(page):
        if runs_here(block):
            runner.run_block(block)
