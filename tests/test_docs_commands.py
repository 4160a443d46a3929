"""Every command the documentation shows runs, at small sizes (issue 10, "Documentation that runs").

The commands are read from the documents at collection time, so a command that changes there is
the one tested here:

* README.md, table "Common tasks": every backtick span of the command column. A span that starts
  with a program (``gaugeflow``, ``torchrun``, ``python``, ``tools/...``, or ``...`` continuing the
  row above) is a command; a ``key=value`` span beside it is a variant (``sample=reweight``), a bare
  name beside ``experiment=X`` another experiment, and names after "→" are files the command must
  leave. Any other span is a test failure, so nothing in the table is skipped silently.
* jobs/README.md, jobs/*/README.md and jobs/aurora/multinode_example.md: every line of every
  ``bash`` code block, and inline spans that run the project's own tools (``gaugeflow``,
  ``torchrun``, ``python``, ``tools/...``). A code block that ``source``s a file runs as one shell
  session. A first word with no stand-in below fails the test.

Small sizes: each command runs as written, with overrides appended that shrink it (Hydra keeps the
last value of a key; a doc value that is already smaller stays): tiny lattices (4^2 in 2d, 2^4 in
4d; a shape the doc gives is capped at 8 in 2d and 2 in 4d), 3 HMC trajectories, 2 training steps of
a 2-layer flow with batch 3, 8 draws. Every command runs in one shared temporary directory, laid
out like the checkout (``tools/``, ``jobs/``), in an order that gives each the files it reads: an
``out=`` or run directory of an earlier command, or, for an ensemble no document makes (``ens.h5``,
``hmc.h5``), an HMC run of the theory that reads it. ``<run dir>`` placeholders are the latest
training run; ``<job number>`` the latest PBS training job, ``<first job number>`` the first job
of the same document.

Stand-ins for what cannot run here (no GPU, no PBS, no network):

* ``torchrun --nproc-per-node=N``: the real torchrun on 2 gloo processes on the CPU (the lattice
  grid's size when one is given), on a free port, ``dist.device=cpu``. A ``...`` row repeats the
  launcher of the row above; its ranks start from the fork server (below) with the variables
  torchrun gives its workers.
* ``tools/submit`` runs as written (``--submit`` hands the script to a fake ``qsub``). The rendered
  script then runs under bash with fake ``module``/``conda`` (which accept only the modules the
  templates pin) and a fake ``mpiexec`` that records its command line and environment. The
  recorded ``gaugeflow`` command then runs, with that environment, on 1 CPU process; the README's
  PBS row on 2, with the variables PALS ``mpiexec`` sets (one rank per node) and the rendezvous on
  the first host of the ``$PBS_NODEFILE`` (this machine's name, then loopback aliases). A script
  only rendered (not submitted) has its command composed (``--cfg job``), except the README's
  row, which runs.
* ``qstat`` and ``qsub FILE``: fakes that check their arguments. An ``mpiexec`` line in a code block
  quotes a rendered script: it must appear in the script the document rendered last.
* ``module load``: the module must be one a template pins. ``python -m venv`` runs with
  ``--without-pip`` (pip is the module Python's, through ``--system-site-packages``); ``pip install
  -e .`` checks that the environment already satisfies every dependency pyproject.toml declares (the
  install itself would write into the checkout). ``wandb sync GLOB``: the glob, with its run
  directory taken from the latest ``logger=wandb`` run, must name offline runs.
* ``logger=wandb``: ``WANDB_MODE`` unset, so the documented default (offline) applies.

``gaugeflow`` and ``python`` commands (and the ranks above) start from a fork server that has
imported torch, Hydra and gaugeflow once (``multiprocessing``'s forkserver): each is still its own
process with its own argv, environment and working directory, calling the same
``gaugeflow.cli.main.main`` as the console script and running the exit handlers an interpreter runs,
without paying ~5 s of imports 40 times. Commands run two at a time; the whole file takes about a
minute and ~75 s of CPU on 2 free cores (``timings.txt`` in its temporary directory has each step).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import os
import pathlib
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from typing import Callable

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
JOB_DOCS = [ROOT / "jobs" / "README.md", *sorted((ROOT / "jobs").glob("*/README.md")),
            ROOT / "jobs" / "aurora" / "multinode_example.md"]
BASH = shutil.which("bash")
TIMEOUT = 300  # seconds for any one process (they take a few)
WORKERS = 2

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


# =============================================================================================
# reading the documents


@dataclasses.dataclass
class DocCommand:
    id: str                 # "README.md:42", "README.md:42[sample=reweight]", "jobs/aurora/README.md:14"
    doc: str                # path relative to the repository
    line: int
    text: str               # the command as the document writes it (one logical line, or a block)
    variant: str | None = None     # a key=value appended, or an experiment name
    outputs: tuple = ()     # files the document says the command leaves ("summary.json", "plots/")
    session: bool = False   # a code block run as one shell session
    readme_row: bool = False
    problem: str | None = None     # a span the test does not know how to run


_SPAN = re.compile(r"`([^`]+)`")
_PROJECT_TOOLS = ("gaugeflow", "torchrun", "python")


def _is_command(span: str) -> bool:
    words = span.split()
    if not words:
        return False
    first = words[0]
    return first in _PROJECT_TOOLS or first == "..." or first.startswith(("tools/", "jobs/"))


def readme_commands(path: pathlib.Path = README) -> list[DocCommand]:
    text = path.read_text()
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "## Common tasks")
    out: list[DocCommand] = []
    for i in range(start + 1, len(lines)):
        ln = lines[i]
        if ln.startswith("## "):
            break
        m = re.match(r"^\|(.*?)\|(.*)\|\s*$", ln)
        if not m or set(m.group(2).strip()) <= set("-|: ") or m.group(2).strip() == "command":
            continue
        cell, lineno = m.group(2), i + 1
        before, arrow, after = cell.partition("→")
        base: DocCommand | None = None
        for span in _SPAN.findall(before):
            if _is_command(span):
                n = sum(1 for c in out if c.line == lineno and c.variant is None and not c.problem)
                base = DocCommand(f"README.md:{lineno}" + (f"#{n}" if n else ""), "README.md", lineno, span,
                                  readme_row=True)
                out.append(base)
            elif base is not None and re.fullmatch(r"[\w.+~/-]+=\S+", span):
                out.append(dataclasses.replace(base, id=f"{base.id}[{span}]", variant=span))
            elif base is not None and re.fullmatch(r"\w+", span) and "experiment=" in base.text:
                out.append(dataclasses.replace(base, id=f"{base.id}[experiment={span}]",
                                               variant=f"experiment={span}"))
            else:
                out.append(DocCommand(f"README.md:{lineno}[{span}]", "README.md", lineno, span, readme_row=True,
                                      problem=f"the span `{span}` is neither a command nor a variant of one"))
        if arrow:
            outputs = tuple(_SPAN.findall(after))
            if base is None:
                out.append(DocCommand(f"README.md:{lineno}[→]", "README.md", lineno, cell, readme_row=True,
                                      problem="outputs named without a command"))
            else:
                for k, c in enumerate(out):
                    if c.line == lineno and c.text == base.text:
                        out[k] = dataclasses.replace(c, outputs=outputs)
    return out


def job_doc_commands(path: pathlib.Path) -> list[DocCommand]:
    rel = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    out: list[DocCommand] = []
    i, prose = 0, []
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):  # a fenced block: every line of a shell block is a command
            lang, block = ln[3:].strip(), []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append((i + 1, lines[i]))
                i += 1
            if lang in ("bash", "sh", "shell", "console", ""):
                out.extend(_block_commands(rel, block))
            i += 1
            continue
        prose.append((i + 1, ln))
        i += 1
    # inline spans of the project's own tools (they may wrap a line)
    joined = "\n".join(t for _, t in prose)
    offsets = []
    pos = 0
    for n, t in prose:
        offsets.append((pos, n))
        pos += len(t) + 1
    for m in _SPAN.finditer(joined):
        span = " ".join(m.group(1).split())
        if _is_command(span) and len(span.split()) > 1:
            line = max(n for p, n in offsets if p <= m.start())
            out.append(DocCommand(f"{rel}:{line}", rel, line, span))
    return out


def _block_commands(rel: str, block: list[tuple[int, str]]) -> list[DocCommand]:
    logical: list[tuple[int, str]] = []
    cur, start = "", None
    for n, t in block:
        if start is None:
            start = n
        if t.rstrip().endswith("\\"):
            cur += t.rstrip()[:-1] + " "
            continue
        cur += t
        if cur.strip() and not cur.strip().startswith("#"):
            logical.append((start, " ".join(cur.split())))
        cur, start = "", None
    if any(_words(t)[:1] == ["source"] for _, t in logical):
        return [DocCommand(f"{rel}:{logical[0][0]}", rel, logical[0][0], "\n".join(t for _, t in logical),
                           session=True)]
    return [DocCommand(f"{rel}:{n}", rel, n, t) for n, t in logical]


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return text.split()


def all_doc_commands() -> list[DocCommand]:
    cmds = readme_commands()
    for path in JOB_DOCS:
        if path.is_file():
            cmds.extend(job_doc_commands(path))
    seen: dict[str, int] = {}
    for k, c in enumerate(cmds):  # ids unique (two commands on one line)
        if c.id in seen:
            seen[c.id] += 1
            cmds[k] = dataclasses.replace(c, id=f"{c.id}#{seen[c.id]}")
        else:
            seen[c.id] = 0
    return cmds


DOC_COMMANDS = all_doc_commands()


# =============================================================================================
# configuration facts the small-size mapping needs (read from conf/, not hard-coded)


def _yaml(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _default_theory(job: str) -> str:
    for item in _yaml(ROOT / "conf" / f"{job}.yaml").get("defaults", []):
        if isinstance(item, dict) and "theory" in item:
            return item["theory"]
    return "u1_2d"


def _theory_dim(name: str) -> int:
    return int(_yaml(ROOT / "conf" / "theory" / f"{name}.yaml")["dim"])


def _experiment(name: str) -> tuple[str | None, dict, list | None]:
    """(theory, theory values, lattice shape) an experiment preset sets."""
    y = _yaml(ROOT / "conf" / "experiment" / f"{name}.yaml")
    theory = None
    for item in y.get("defaults", []):
        if isinstance(item, dict):
            for k, v in item.items():
                if k.split()[-1].strip("/") == "theory":
                    theory = v
    return theory, dict(y.get("theory") or {}), (y.get("lattice") or {}).get("shape")


def _pinned_modules() -> list[str]:
    mods = []
    for t in sorted((ROOT / "jobs").glob("*/*.pbs")):
        m = re.search(r"^# gaugeflow-template:.*\bmodule=(\S+)", t.read_text(), re.MULTILINE)
        if m:
            mods.append(m.group(1))
    return mods


def _template_job(template: str) -> str:
    text = (ROOT / template).read_text()
    m = re.search(r"^# gaugeflow-template:.*\bjob=(\w+)", text, re.MULTILINE)
    return m.group(1) if m else "train"


@dataclasses.dataclass
class Theory:
    name: str
    values: dict

    @property
    def dim(self) -> int:
        return _theory_dim(self.name)

    def overrides(self) -> list[str]:
        return [f"theory={self.name}", *[f"theory.{k}={v}" for k, v in self.values.items()]]


def _tiny_shape(dim: int) -> list[int]:
    return [4] * dim if dim <= 2 else [2] * dim


def _capped_shape(shape: list[int], dim: int) -> list[int]:
    cap = 8 if dim <= 2 else 2
    return [min(int(x), cap) for x in shape]


def _shape_text(shape) -> str:
    return "[" + ",".join(str(int(x)) for x in shape) + "]"


def _parse_shape(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =============================================================================================
# running: processes, fork server, fakes


@dataclasses.dataclass
class Result:
    argv: list
    rc: int | None
    out: str
    err: str
    seconds: float

    def describe(self) -> str:
        tail = lambda s: s[-2500:]  # noqa: E731
        return (f"$ {shlex.join(str(a) for a in self.argv)}\nexit {self.rc} after {self.seconds:.1f} s\n"
                f"--- stdout ---\n{tail(self.out)}\n--- stderr ---\n{tail(self.err)}")


class StepFailed(AssertionError):
    pass


def _forked(kind: str, argv: list, cwd: str, env: dict, out_path: str, err_path: str) -> None:
    """The child of the fork server: one command with its own argv, environment and directory."""
    import traceback

    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    code = 0
    try:
        import torch

        torch.set_num_threads(1)
        if kind == "gaugeflow":
            from gaugeflow.cli.main import main

            sys.argv = ["gaugeflow", *argv]
            main(list(argv))
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            import runpy

            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            import runpy

            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        c = exc.code
        if c is None:
            code = 0
        elif isinstance(c, int):
            code = c
        else:
            print(c, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported like the interpreter would
        traceback.print_exc()
        code = 1
    finally:
        import atexit

        try:  # what an interpreter does at exit (wandb's teardown, for one)
            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = code or 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        import resource

        use = resource.getrusage(resource.RUSAGE_SELF)
        with open(out_path + ".cpu", "w") as fh:  # this child's CPU seconds, for the timing summary
            fh.write(f"{use.ru_utime + use.ru_stime}\n")
    os._exit(code)


_FORKSERVER = None


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        ctx = multiprocessing.get_context("forkserver")
        # what every child would import anyway: torch, Hydra, the jobs, and this module (the child's target)
        ctx.set_forkserver_preload(["torch", "h5py", "numpy", "hydra", "omegaconf", "yaml", "pytest",
                                    "gaugeflow.cli.main", "gaugeflow.distributed", "gaugeflow.cli.hmc",
                                    "gaugeflow.cli.train", "gaugeflow.cli.sample", "gaugeflow.cli.score",
                                    "gaugeflow.cli.analyze", "gaugeflow.train", "gaugeflow.observables",
                                    "gaugeflow.plots", "matplotlib.pyplot", "pyerrors", "scipy.stats",
                                    "torch._dynamo",  # imported by torch.optim's first optimizer: 2 s
                                    _forked.__module__])
        _FORKSERVER = ctx
    return _FORKSERVER


class Runner:
    """The shared work directory, the fake site tools, and the ways of running a command."""

    def __init__(self, work: pathlib.Path):
        self.work = work
        self.logs = work / "_logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in ("tools", "jobs", "pyproject.toml"):  # laid out like the checkout
            (work / name).symlink_to(ROOT / name)
        self.fakebin = work / "_fakebin"
        self.fakebin.mkdir()
        self.pbs = work / "_pbs"
        self.pbs.mkdir()
        self._write_fakes()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "PMI_", "PALS_",
                                    "OMPI_", "SLURM_", "PBS_", "TORCHELASTIC"))}
        env.update(HYDRA_FULL_ERROR="0", WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   USER=os.environ.get("USER") or "tester")
        env["PATH"] = f"{self.fakebin}:{env.get('PATH', '')}"
        self.env = env
        self.counter = 0
        self.timings: list[tuple[str, float]] = []
        self.forked_cpu = 0.0  # CPU seconds of the fork server's children (they are not ours to wait for)

    def _write_fakes(self) -> None:
        py = sys.executable
        fakes = {
            # python -m venv: without pip (the module Python's pip stays visible through
            # --system-site-packages); anything else is the real interpreter
            "python": f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "venv" ]; then exec "{py}" "$@" --without-pip; fi\n'
                      f'exec "{py}" "$@"\n',
            "module": '#!/bin/sh\ncase "$1" in\n  use) exit 0 ;;\n  load) for m in $FAKE_MODULES; do '
                      '[ "$m" = "$2" ] && exit 0; done\n'
                      '    echo "module stand-in: $2 is no module a template pins ($FAKE_MODULES)" >&2; exit 1 ;;\n'
                      'esac\necho "module stand-in: no stand-in for module $*" >&2; exit 3\n',
            "conda": '#!/bin/sh\n[ "$1" = "activate" ] && exit 0\necho "conda stand-in: $*" >&2; exit 3\n',
            "qsub": '#!/bin/sh\nid="${FAKE_QSUB_JOBID:?qsub stand-in: no job id planned for this command}"\n'
                    'if [ $# -gt 1 ]; then echo "qsub stand-in: takes one script file or stdin" >&2; exit 3; fi\n'
                    'if [ $# -eq 1 ]; then cp "$1" "$FAKE_PBS_DIR/$id.pbs" || exit 1; '
                    'else cat > "$FAKE_PBS_DIR/$id.pbs"; fi\n'
                    'head -1 "$FAKE_PBS_DIR/$id.pbs" | grep -q "^#!" && grep -q "^#PBS -A " "$FAKE_PBS_DIR/$id.pbs" '
                    '|| { echo "qsub: not a PBS script" >&2; exit 1; }\necho "$id.fake-pbs"\n',
            "qstat": '#!/bin/sh\ncase "$1" in -u|-Qf|-f|-x) [ -n "$2" ] && exit 0 ;; esac\n'
                     'echo "qstat stand-in: unexpected arguments: $*" >&2; exit 3\n',
            "mpiexec": '#!/bin/sh\nprintf "%s\\n" "$@" > "$MPIEXEC_LOG.args"\nenv -0 > "$MPIEXEC_LOG.env"\n',
            "wandb": '#!/bin/sh\n[ "$1" = "sync" ] || { echo "wandb stand-in: only sync" >&2; exit 3; }\nshift\n'
                     '[ $# -gt 0 ] || exit 2\nfor p in "$@"; do case "$(basename "$p")" in offline-run-*) ;; '
                     '*) echo "wandb sync: $p is no offline run" >&2; exit 1 ;; esac\n'
                     '  [ -d "$p" ] || { echo "wandb sync: no such directory $p" >&2; exit 1; }; done\n'
                     'echo "(stand-in) would sync $*"\n',
            "pip": f'#!{py}\n' + _FAKE_PIP,
        }
        for name, text in fakes.items():
            p = self.fakebin / name
            p.write_text(text)
            p.chmod(0o755)

    def next_log(self, stem: str) -> tuple[pathlib.Path, pathlib.Path]:
        self.counter += 1
        safe = re.sub(r"[^\w.-]+", "_", stem)[:60]
        return self.logs / f"{self.counter:03d}-{safe}.out", self.logs / f"{self.counter:03d}-{safe}.err"

    def forked(self, kind: str, argv: list, *, env: dict | None = None, label: str = "") -> Result:
        out, err = self.next_log(label or argv[0])
        t0 = time.monotonic()
        p = _forkserver().Process(target=_forked, args=(kind, list(argv), str(self.work), dict(env or self.env),
                                                         str(out), str(err)))
        p.start()
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join()
        res = Result([kind if kind == "gaugeflow" else "python", *argv], p.exitcode,
                     out.read_text(errors="replace"), err.read_text(errors="replace"), time.monotonic() - t0)
        self.timings.append((label, res.seconds))
        cpu = pathlib.Path(str(out) + ".cpu")
        if cpu.is_file():
            self.forked_cpu += float(cpu.read_text())
            self.timings[-1] = (f"{label} [{float(cpu.read_text()):.1f} s CPU]", res.seconds)
        return res

    def process(self, argv: list, *, env: dict | None = None, label: str = "", input: str | None = None) -> Result:
        t0 = time.monotonic()
        try:
            done = subprocess.run([str(a) for a in argv], cwd=self.work, env=env or self.env, capture_output=True,
                                  text=True, timeout=TIMEOUT, input=input)
            rc, so, se = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, so, se = None, str(exc.stdout or ""), f"timed out after {TIMEOUT} s\n{exc.stderr or ''}"
        res = Result(list(argv), rc, so, se, time.monotonic() - t0)
        self.timings.append((label, res.seconds))
        return res

    def ranks(self, argv: list, envs: list[dict], label: str = "") -> list[Result]:
        """The ranks of one launch, started together from the fork server, as an MPI launcher starts
        its processes with their environments; once one fails, the others are stopped."""
        t0 = time.monotonic()
        ctx = _forkserver()
        started = []
        for k, env in enumerate(envs):
            out, err = self.next_log(f"{label}-rank{k}")
            p = ctx.Process(target=_forked, args=("gaugeflow", list(argv), str(self.work), dict(env), str(out),
                                                  str(err)))
            p.start()
            started.append((p, out, err))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and any(p.is_alive() for p, _, _ in started):
            if any(p.exitcode not in (None, 0) for p, _, _ in started):
                time.sleep(5)  # the others' own one-line reports first
                break
            time.sleep(0.2)
        results = []
        for p, out, err in started:
            if p.is_alive():
                p.kill()
            p.join()
            cpu = pathlib.Path(str(out) + ".cpu")
            if cpu.is_file():
                self.forked_cpu += float(cpu.read_text())
            results.append(Result(["gaugeflow", *argv], p.exitcode, out.read_text(errors="replace"),
                                  err.read_text(errors="replace"), time.monotonic() - t0))
        self.timings.append((label, time.monotonic() - t0))
        return results

    def bash(self, script: str, *, env: dict | None = None, label: str = "") -> Result:
        return self.process([BASH, "-c", script], env=env, label=label)


_FAKE_PIP = r'''
"""pip stand-in: `pip install -e .` only checks that this environment satisfies pyproject.toml."""
import pathlib, sys
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement

if sys.argv[1:] != ["install", "-e", "."]:
    sys.exit(f"pip stand-in: no stand-in for pip {' '.join(sys.argv[1:])}")
try:
    import tomllib
    deps = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["dependencies"]
except ImportError:  # Python 3.10: the installed package's metadata
    deps = [r for r in requires("gaugeflow") if "extra ==" not in r]
bad = []
for text in deps:
    req = Requirement(text)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        bad.append(f"{req} (not installed)")
        continue
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        bad.append(f"{req} (found {have})")
if bad:
    sys.exit("pip install -e . would have to install: " + "; ".join(bad))
print(f"(stand-in) all {len(deps)} requirements of pyproject.toml are satisfied here")
'''


# =============================================================================================
# planning: what each documented command runs, and what it needs first


@dataclasses.dataclass
class RunInfo:
    """A training run directory a later command may name."""
    entry: str
    path: str
    theory: Theory
    shape: list
    steps: int
    job_number: str | None = None


@dataclasses.dataclass
class Entry:
    id: str
    label: str
    run: Callable[[Runner], None]
    deps: list = dataclasses.field(default_factory=list)
    reported: bool = True


_SIZES = {
    "hmc": {"hmc.n_traj": 3, "hmc.n_therm": 1},
    "train": {"train.steps": 2, "train.batch_size": 3, "train.eval_samples": 8, "train.log_every": 1},
    "sample": {"sample.n": 8, "sample.batch_size": 4},
    "score": {"score.batch_size": 4},
    "analyze": {},
}
_MODEL = {"model.n_layers": 2, "model.hidden": "[4]"}
_TOOL_SIZES = {
    "flow_bench.py": ["--shape", "4", "4", "--layers", "2", "--hidden", "4", "--batch", "4", "--steps", "2",
                      "--eval-every", "1", "--eval-n", "4", "--final-n", "4", "--max-time", "60"],
    "bench.py": ["--workloads", "u1-2d", "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--hmc-trajectories", "0"],
}
_RUN_PLACEHOLDER = re.compile(r"<(run dir|run dir or checkpoint|checkpoint or run dir|run dir or checkpoint file)>")


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


def _kv(tokens: list[str]) -> dict:
    out = {}
    for t in tokens:
        if "=" in t and not t.startswith("-"):
            k, v = t.split("=", 1)
            out[k.lstrip("+~")] = v
    return out


def _smaller(doc_value, ours) -> bool:
    """Append ours unless the document's value is already as small."""
    if doc_value is None:
        return True
    try:
        return float(ours) < float(doc_value)
    except (TypeError, ValueError):
        return True


class Planner:
    def __init__(self):
        self.entries: list[Entry] = []
        self.producers: dict[str, tuple[str, Theory | None, list | None]] = {}  # path -> (entry, theory, shape)
        self.runs: list[RunInfo] = []
        self.wandb_runs: list[RunInfo] = []
        self.pbs_train_jobs: list[RunInfo] = []
        self.doc_jobs: dict[str, list[str]] = {}     # doc -> job numbers it submitted
        self.rendered: dict[str, tuple[str, str, str, list]] = {}  # doc -> (entry, script path, job, overrides)
        self.scripts: dict[str, tuple[str, str, list]] = {}        # script path -> (entry, job, overrides)
        self.last_in_table: list[str] | None = None
        self.venv_entry: str | None = None
        base = random.Random().randrange(10000, 90000)
        self._jobs = iter(str(base * 10 + k) for k in range(10**6))
        self.modules = _pinned_modules()

    # -- helpers -------------------------------------------------------------------------------
    def add(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        return entry

    def job_number(self) -> str:
        from gaugeflow.distributed.env import job_port

        for jid in self._jobs:  # one whose rendezvous port is free now
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", job_port(f"{jid}.fake-pbs")))
                except OSError:
                    continue
            return jid
        raise RuntimeError("no job number with a free port")

    def latest_run(self, doc_id: str) -> RunInfo:
        if not self.runs:
            raise StepFailed(f"{doc_id}: a <run dir> placeholder but no training run comes before it")
        return self.runs[-1]

    def need(self, path: str, doc_id: str, deps: list) -> tuple[Theory | None, list | None] | None:
        key = os.path.normpath(path)
        if key in self.producers:
            entry, theory, shape = self.producers[key]
            if entry:
                deps.append(entry)
            return theory, shape
        for r in self.runs:
            if os.path.normpath(r.path) == key:
                deps.append(r.entry)
                return r.theory, r.shape
        return None

    def setup_ensemble(self, path: str, theory: Theory, shape: list) -> str:
        """An HMC ensemble no document makes (``ens.h5``, ``hmc.h5``) for the theory that reads it."""
        key = os.path.normpath(path)
        if key in self.producers:
            return self.producers[key][0]
        argv = ["hmc", *theory.overrides(), f"lattice.shape={_shape_text(shape)}", "hmc.n_traj=4", "hmc.n_therm=1",
                f"out={path}", f"hydra.run.dir=runs/setup-{_slug(path)}"]
        eid = f"setup:{path}"

        def run(r: Runner, argv=argv):
            res = r.forked("gaugeflow", argv, label=eid)
            _expect(res, eid, files=[path], work=r.work)

        self.add(Entry(eid, f"gaugeflow {shlex.join(argv)}", run, reported=False))
        self.producers[key] = (eid, theory, shape)
        return eid

    # -- gaugeflow commands -------------------------------------------------------------------
    def gaugeflow(self, tokens: list[str], eid: str, *, deps: list, outputs=(), variant: str | None = None,
                  job_number: str | None = None) -> tuple[list[str], dict, Callable[[Runner, Result], None]]:
        """(argv after `gaugeflow`, from the job on; environment changes; a check of the result) at small sizes."""
        job, args = tokens[0], list(tokens[1:])
        if variant:  # replaces the document's value of the same key (a config group takes one), else added
            vkey = variant.split("=", 1)[0]
            same = [k for k, a in enumerate(args) if a.split("=", 1)[0].lstrip("+~") == vkey]
            if same:
                args[same[0]] = variant
            else:
                args.append(variant)
        args = [a for a in args if a != "..."]
        src_run: RunInfo | None = None
        for a in args:
            if re.search(r"<[^>]+>", a):
                raise StepFailed(f"{eid}: no stand-in for the placeholder in {a!r}")
        kv = _kv(args)
        if any(a in ("--help", "-h", "--hydra-help", "--info") for a in args) or "--cfg" in args or "-c" in args:
            def check(r: Runner, res: Result):
                _expect(res, eid)
                assert res.out.strip(), f"{eid}: printed nothing\n{res.describe()}"
            return [job, *args], {}, check
        if job not in _SIZES:
            raise StepFailed(f"{eid}: no small-size mapping for the job {job!r}")
        multirun = "-m" in args or "--multirun" in args
        env: dict = {}
        extra: list[str] = []
        for k, v in _SIZES[job].items():
            if _smaller(kv.get(k), v):
                extra.append(f"{k}={v}")
        files: list[str] = []
        dirs_with: list[tuple[str, str]] = []

        # the theory and the source run
        theory = Theory(_default_theory(job), {})
        shape: list | None = None
        exp = kv.get("experiment")
        if exp:
            t, vals, _ = _experiment(exp)
            theory = Theory(t or theory.name, dict(vals))
        for key in ("resume", "init_from", "checkpoint"):
            if key in kv:
                found = self.need(kv[key], eid, deps)
                if found is None:
                    raise StepFailed(f"{eid}: {key}={kv[key]} names no run an earlier command makes")
                src = next((r for r in self.runs if os.path.normpath(r.path) == os.path.normpath(kv[key])), None)
                src_run = src or src_run
                theory = Theory(found[0].name, dict(found[0].values))
                shape = list(found[1])
        if "theory" in kv:
            theory = Theory(kv["theory"], {} if kv["theory"] != theory.name else theory.values)
        theory.values.update({k[len("theory."):]: v for k, v in kv.items() if k.startswith("theory.")})
        dim = theory.dim if theory.name else 2  # analyze names no theory
        if "lattice.shape" in kv:
            shape = _capped_shape(_parse_shape(kv["lattice.shape"]), dim)
            extra.append(f"lattice.shape={_shape_text(shape)}")
        elif shape is None:
            shape = _tiny_shape(dim)
            if job in ("hmc", "train") and "hmc.continue_from" not in kv:
                extra.append(f"lattice.shape={_shape_text(shape)}")

        run_dir = kv.get("hydra.run.dir")
        if run_dir is None and not multirun:
            run_dir = f"runs/{_slug(eid)}"
            extra.append(f"hydra.run.dir={run_dir}")
        if multirun:
            run_dir = f"runs/{_slug(eid)}"
            extra.append(f"hydra.sweep.dir={run_dir}")

        if job == "hmc":
            if "hmc.continue_from" in kv:
                found = self.need(kv["hmc.continue_from"], eid, deps)
                if found is None:
                    raise StepFailed(f"{eid}: hmc.continue_from={kv['hmc.continue_from']}: no earlier command makes it")
                if found[1] is not None:
                    extra.append(f"lattice.shape={_shape_text(found[1])}")
                    shape = list(found[1])
            if multirun:
                dirs_with.append((run_dir, "ensemble.h5"))
            else:
                files.append(kv.get("out") or f"{run_dir}/ensemble.h5")
        elif job == "train":
            steps = 2
            if "resume" in kv:
                assert src_run is not None
                steps = src_run.steps + 1
                extra = [e for e in extra if not e.startswith(("train.steps=", "train.batch_size=", "lattice.shape="))]
                if _smaller(kv.get("train.steps"), steps):
                    extra.append(f"train.steps={steps}")
                files.append(f"{src_run.path}/checkpoints/step_{steps:08d}.h5")
            else:
                if "init_from" not in kv:
                    extra += [f"{k}={v}" for k, v in _MODEL.items() if k not in kv]
                files.append(f"{run_dir}/checkpoints")
            if "loss.ensemble" in kv and self.need(kv["loss.ensemble"], eid, deps) is None:
                deps.append(self.setup_ensemble(kv["loss.ensemble"], theory, shape))
            if kv.get("dist") in ("ddp", "fsdp"):
                extra += ["dist.device=cpu", "dist.timeout_s=120"]
            if kv.get("logger") == "wandb":
                env["WANDB_MODE"] = None  # the documented default: offline
                dirs_with.append((f"{run_dir}/wandb", "offline-run-*"))
        elif job == "sample":
            if "checkpoint" not in kv:
                raise StepFailed(f"{eid}: sample without checkpoint=")
            if "out" in kv and variant:  # the variant's file beside, not over, the one later rows read
                args = [a for a in args if not a.startswith("out=")]
                extra.append(f"out=variants/{_slug(variant)}/{kv['out']}")
            elif "out" in kv:
                files.append(kv["out"])
            if kv.get("dist") in ("ddp", "fsdp"):
                extra += ["dist.device=cpu", "dist.timeout_s=120"]
        elif job == "score":
            if "ensemble" in kv and self.need(kv["ensemble"], eid, deps) is None:
                deps.append(self.setup_ensemble(kv["ensemble"], theory, shape))
            if "out" in kv:
                files.append(kv["out"])
        elif job == "analyze":
            if "ensemble" in kv and self.need(kv["ensemble"], eid, deps) is None:
                raise StepFailed(f"{eid}: ensemble={kv['ensemble']}: no earlier command makes it")
        for o in outputs:  # what the document says the command leaves in its run directory
            files.append(f"{run_dir}/{o.rstrip('/')}")

        # what later commands may read
        if "out" in kv and not variant:
            self.producers[os.path.normpath(kv["out"])] = (eid, theory, shape)
        if job == "train" and not variant:
            if "resume" in kv and src_run is not None:
                src_run.steps = steps
                src_run.entry = eid  # later readers wait for the resumed run
            elif not multirun:
                info = RunInfo(eid, run_dir, theory, shape, steps, job_number)
                self.runs.append(info)
                if kv.get("logger") == "wandb":
                    self.wandb_runs.append(info)
                if job_number:
                    self.pbs_train_jobs.append(info)

        def check(r: Runner, res: Result):
            _expect(res, eid, files=files, work=r.work)
            for d, pattern in dirs_with:
                found = sorted((r.work / d).glob(pattern)) if pattern != "ensemble.h5" else \
                    sorted((r.work / d).glob(f"*/{pattern}"))
                assert found, f"{eid}: nothing matches {d}/{pattern}\n{res.describe()}"

        return [job, *args, *extra], env, check

    def plan_gaugeflow(self, cmd: DocCommand, tokens: list[str]) -> None:
        deps: list = []
        argv, env_changes, check = self.gaugeflow(tokens[1:], cmd.id, deps=deps, outputs=cmd.outputs,
                                                  variant=cmd.variant)

        def run(r: Runner):
            env = _with(r.env, env_changes)
            res = r.forked("gaugeflow", argv, env=env, label=cmd.id)
            check(r, res)

        self.add(Entry(cmd.id, cmd.text, run, deps))

    def plan_torchrun(self, cmd: DocCommand, tokens: list[str], continued: bool = False) -> None:
        """torchrun on 2 CPU processes (the lattice grid's size when one is given).

        ``continued``: a ``...`` row repeats the launcher of the row above, which ran torchrun itself;
        its ranks start from the fork server with the variables torchrun gives its workers.
        """
        try:
            i = tokens.index("gaugeflow.cli.main")
        except ValueError:
            raise StepFailed(f"{cmd.id}: torchrun without -m gaugeflow.cli.main") from None
        launcher, job_tokens = tokens[:i + 1], tokens[i + 1:]
        deps: list = []
        argv, env_changes, check = self.gaugeflow(job_tokens, cmd.id, deps=deps, outputs=cmd.outputs,
                                                  variant=cmd.variant)
        grid = _kv(argv).get("dist.lattice_grid")
        nproc = math.prod(_parse_shape(grid)) if grid else 2
        new, skip = [], False
        for t in launcher:
            if skip:
                skip = False
                continue
            if t.startswith(("--nproc-per-node", "--nproc_per_node")):
                if "=" not in t:
                    skip = True
                new.append(f"--nproc-per-node={nproc}")
            else:
                new.append(t)
        port_given = any(t.startswith(("--master-port", "--master_port", "--standalone", "--rdzv")) for t in new)

        def run(r: Runner):
            env = _with(r.env, env_changes)
            if continued:
                port, run_id = str(_free_port()), f"docs-{_free_port()}"
                envs = [dict(env, RANK=str(k), WORLD_SIZE=str(nproc), LOCAL_RANK=str(k), LOCAL_WORLD_SIZE=str(nproc),
                             GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TORCHELASTIC_RUN_ID=run_id)
                        for k in range(nproc)]
                results = r.ranks(argv, envs, label=f"{cmd.id} ({nproc} ranks)")
                for k, res in enumerate(results):
                    if res.rc != 0:
                        raise StepFailed(f"{cmd.id}: rank {k}: exit {res.rc}\n{res.describe()}")
                check(r, results[0])
                return
            full = list(new)
            if not port_given:
                full.insert(1, f"--master-port={_free_port()}")
            exe = shutil.which("torchrun", path=r.env["PATH"]) or "torchrun"
            res = r.process([exe, *full[1:], *argv], env=env, label=cmd.id)
            check(r, res)

        self.add(Entry(cmd.id, cmd.text, run, deps))

    def plan_python(self, cmd: DocCommand, tokens: list[str]) -> None:
        args = tokens[1:]
        if args[:1] == ["-c"]:
            pass
        elif args[:1] == ["-m"]:
            pass
        elif args and args[0].endswith(".py"):
            name = pathlib.Path(args[0]).name
            if name not in _TOOL_SIZES:
                raise StepFailed(f"{cmd.id}: no small-size arguments known for {args[0]}")
            args = [*args, *_TOOL_SIZES[name]]
        else:
            raise StepFailed(f"{cmd.id}: no stand-in for python {' '.join(args)}")

        def run(r: Runner):
            res = r.forked("python", args, label=cmd.id)
            _expect(res, cmd.id)
            assert res.out.strip(), f"{cmd.id}: printed nothing\n{res.describe()}"

        self.add(Entry(cmd.id, cmd.text, run))

    # -- PBS ------------------------------------------------------------------------------------
    def plan_submit(self, cmd: DocCommand, text: str, tokens: list[str]) -> None:
        """tools/submit as written; then the script runs as PBS would run it (see the module docstring)."""
        if "--" in tokens:
            overrides = tokens[tokens.index("--") + 1:]
            opts = tokens[1:tokens.index("--")]
        else:
            overrides, opts = [], tokens[1:]
        if "--help" in opts or "-h" in opts:
            def run_help(r: Runner):
                res = r.bash(text, label=cmd.id)
                _expect(res, cmd.id)
                assert "usage" in res.out.lower(), res.describe()
            self.add(Entry(cmd.id, cmd.text, run_help))
            return
        template = opts[opts.index("--template") + 1] if "--template" in opts else "jobs/aurora/train.pbs"
        job = _template_job(template)
        out = opts[opts.index("--out") + 1] if "--out" in opts else None
        submitted = "--submit" in opts
        execute = submitted or cmd.readme_row
        deps: list = []
        jid = self.job_number() if execute else None
        if submitted:
            self.doc_jobs.setdefault(cmd.doc, []).append(jid)
        script_path = out or f"_pbs/{_slug(cmd.id)}.pbs"
        if out:
            self.producers[os.path.normpath(out)] = (cmd.id, None, None)
        self.scripts[os.path.normpath(script_path)] = (cmd.id, job, overrides)
        self.rendered[cmd.doc] = (cmd.id, script_path, job, overrides)
        ranks = 2 if cmd.readme_row else 1
        job_plan = self._pbs_job_plan(cmd.id, job, overrides, jid, deps) if execute else None
        deps.append("setup:venv")

        def run(r: Runner):
            env = dict(r.env, FAKE_PBS_DIR=str(r.pbs), FAKE_MODULES=" ".join(self.modules))
            if jid:
                env["FAKE_QSUB_JOBID"] = jid
            res = r.bash(text, env=env, label=cmd.id)
            _expect(res, cmd.id)
            if submitted:
                assert res.out.strip() == f"{jid}.fake-pbs", f"{cmd.id}: --submit did not print qsub's job id\n" \
                                                             f"{res.describe()}"
                script = r.pbs / f"{jid}.pbs"
            elif out:
                script = r.work / out
            else:
                script = r.work / script_path
                script.write_text(res.out)
            _run_pbs(r, cmd.id, script, jid, job_plan, ranks=ranks, compose_only=not execute)

        self.add(Entry(cmd.id, cmd.text, run, deps))

    def plan_qsub(self, cmd: DocCommand, text: str, tokens: list[str]) -> None:
        if len(tokens) != 2:
            raise StepFailed(f"{cmd.id}: qsub stand-in takes one script file")
        key = os.path.normpath(tokens[1])
        if key not in self.scripts:
            raise StepFailed(f"{cmd.id}: qsub {tokens[1]}: no earlier command renders that script")
        render_entry, job, overrides = self.scripts[key]
        deps = [render_entry, "setup:venv"]
        jid = self.job_number()
        self.doc_jobs.setdefault(cmd.doc, []).append(jid)
        job_plan = self._pbs_job_plan(cmd.id, job, overrides, jid, deps)

        def run(r: Runner):
            env = dict(r.env, FAKE_PBS_DIR=str(r.pbs), FAKE_QSUB_JOBID=jid)
            res = r.bash(text, env=env, label=cmd.id)
            _expect(res, cmd.id)
            assert res.out.strip() == f"{jid}.fake-pbs", res.describe()
            _run_pbs(r, cmd.id, r.pbs / f"{jid}.pbs", jid, job_plan, ranks=1, compose_only=False)

        self.add(Entry(cmd.id, cmd.text, run, deps))

    def _resolve_job_placeholders(self, cmd: DocCommand, value, deps: list):
        def sub(s: str) -> str:
            if "<first job number>" in s:
                jobs = self.doc_jobs.get(cmd.doc)
                if not jobs:
                    raise StepFailed(f"{cmd.id}: <first job number> but no job was submitted before in {cmd.doc}")
                run = next((x for x in self.pbs_train_jobs if x.job_number == jobs[0]), None)
                if run is None:
                    raise StepFailed(f"{cmd.id}: <first job number> is no training job")
                deps.append(run.entry)
                s = s.replace("<first job number>", jobs[0])
            if "<job number>" in s:
                if not self.pbs_train_jobs:
                    raise StepFailed(f"{cmd.id}: <job number> but no PBS training job runs before it")
                run = self.pbs_train_jobs[-1]
                deps.append(run.entry)
                s = s.replace("<job number>", run.job_number)
            return s
        if isinstance(value, list):
            return [sub(v) for v in value]
        return sub(value)

    def _pbs_job_plan(self, eid: str, job: str, overrides: list, jid: str, deps: list):
        run_dir = f"outputs/{job}/{jid}"
        argv, env_changes, check = self.gaugeflow([job, *overrides, f"hydra.run.dir={run_dir}"], eid, deps=deps,
                                                  job_number=jid if job == "train" else None)
        # the small-size overrides the recorded command gets (those of the document's own are in it already)
        doc_args = [job, *overrides, f"hydra.run.dir={run_dir}"]
        extra = argv[len(doc_args):]
        if not any(e.startswith("dist.device=") for e in extra):  # the templates' xpu/cuda, on the CPU here
            extra += ["dist.device=cpu", "dist.timeout_s=120"]
        return extra, env_changes, check

    def plan_mpiexec_quote(self, cmd: DocCommand, text: str) -> None:
        if cmd.doc not in self.rendered:
            raise StepFailed(f"{cmd.id}: an mpiexec line but {cmd.doc} renders no script before it")
        render_entry, script_path, _, _ = self.rendered[cmd.doc]

        def run(r: Runner):
            script = (r.work / script_path).read_text()
            flat = " ".join(script.replace("\\\n", " ").split())
            assert " ".join(text.split()) in flat, (
                f"{cmd.id}: the document quotes\n  {text}\nbut {script_path} runs\n  "
                + "\n  ".join(ln for ln in script.splitlines() if "mpiexec" in ln or "gaugeflow train" in ln
                              or "gaugeflow sample" in ln))

        self.add(Entry(cmd.id, cmd.text, run, [render_entry]))

    def plan_shell(self, cmd: DocCommand, text: str, deps: list | None = None) -> None:
        """qstat, module, wandb sync, pip, a sourced session: bash with the fakes on PATH."""

        def run(r: Runner):
            env = dict(r.env, FAKE_PBS_DIR=str(r.pbs), FAKE_MODULES=" ".join(self.modules))
            res = r.bash("set -e\n" + text, env=env, label=cmd.id)
            _expect(res, cmd.id)

        self.add(Entry(cmd.id, cmd.text, run, list(deps or [])))

    # -- dispatch ---------------------------------------------------------------------------------
    def plan(self, cmd: DocCommand) -> None:
        try:
            self._plan(cmd)
        except StepFailed as err:
            msg = str(err)
            self.add(Entry(cmd.id, cmd.text, lambda r, msg=msg: _fail(msg)))

    def _plan(self, cmd: DocCommand) -> None:
        if cmd.problem:
            raise StepFailed(f"{cmd.id}: {cmd.problem}; teach tests/test_docs_commands.py to run it "
                             "or change the document")
        if cmd.session:
            self._plan_session(cmd)
            return
        pre: list = []
        text = self._resolve(cmd, cmd.text, pre)
        tokens = _words(text)
        if not tokens:
            raise StepFailed(f"{cmd.id}: an empty command")
        n_before = len(self.entries)
        self._dispatch(cmd, text, tokens)
        for e in self.entries[n_before:]:
            if e.id == cmd.id:
                e.deps = list(dict.fromkeys([*pre, *e.deps]))

    def _resolve(self, cmd: DocCommand, text: str, deps: list) -> str:
        """The document's placeholders, replaced by what earlier commands made (their entries become deps)."""
        if _RUN_PLACEHOLDER.search(text):
            run = self.latest_run(cmd.id)
            deps.append(run.entry)
            text = _RUN_PLACEHOLDER.sub(run.path, text)
        if _words(text)[:2] == ["wandb", "sync"] and "<" in text:
            if not self.wandb_runs:
                raise StepFailed(f"{cmd.id}: wandb sync but no logger=wandb run comes before it")
            w = self.wandb_runs[-1]
            deps.append(w.entry)
            text = re.sub(r"outputs/train/<[^>]+>", w.path, text)
        text = self._resolve_job_placeholders(cmd, text, deps)
        m = re.search(r"<[^<>]+>", text)
        if m and not text.lstrip().startswith(("mpiexec",)):
            raise StepFailed(f"{cmd.id}: no stand-in for the placeholder {m.group(0)}")
        return text

    def _dispatch(self, cmd: DocCommand, text: str, tokens: list[str]) -> None:
        continued = False
        if tokens[0] == "...":
            if cmd.readme_row and self.last_in_table and tokens[1:2] and tokens[1] in _SIZES:
                tokens = [*self.last_in_table, *tokens[1:]]
                text = shlex.join(tokens)
                continued = True
            else:
                raise StepFailed(f"{cmd.id}: '...' continues no command of the row above")
        first = tokens[0]
        if cmd.readme_row and cmd.variant is None:
            if first == "torchrun" and "gaugeflow.cli.main" in tokens:
                self.last_in_table = tokens[:tokens.index("gaugeflow.cli.main") + 1]
            elif first == "gaugeflow":
                self.last_in_table = ["gaugeflow"]
        if first == "gaugeflow":
            self.plan_gaugeflow(cmd, tokens)
        elif first == "torchrun":
            self.plan_torchrun(cmd, tokens, continued=continued)
        elif first == "python":
            self.plan_python(cmd, tokens)
        elif first == "tools/submit":
            self.plan_submit(cmd, text, tokens)
        elif first == "qsub":
            self.plan_qsub(cmd, text, tokens)
        elif first == "mpiexec":
            self.plan_mpiexec_quote(cmd, text)
        elif first in ("qstat", "module"):
            self.plan_shell(cmd, text)
        elif first == "wandb":
            self.plan_shell(cmd, text)
        else:
            raise StepFailed(f"{cmd.id}: no stand-in for `{first}` (in {cmd.text!r})")

    def _plan_session(self, cmd: DocCommand) -> None:
        known = {"module", "python", "source", "pip", "cd", "export"}
        for line in cmd.text.splitlines():
            first = _words(line)[:1]
            if not first or first[0] not in known:
                raise StepFailed(f"{cmd.id}: no stand-in for `{line}` in a shell session")
            if first[0] == "python" and _words(line)[1:3] == ["-m", "venv"] and self.venv_entry is None:
                self.venv_entry = cmd.id
        self.plan_shell(cmd, cmd.text)


def _with(env: dict, changes: dict) -> dict:
    out = dict(env)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _fail(msg: str) -> None:
    raise StepFailed(msg)


def _expect(res: Result, eid: str, *, files=(), work: pathlib.Path | None = None) -> None:
    if res.rc != 0:
        raise StepFailed(f"{eid}: exit {res.rc}\n{res.describe()}")
    for f in files:
        assert work is not None and (work / f).exists(), f"{eid}: {f} was not written\n{res.describe()}"


def _run_pbs(r: Runner, eid: str, script: pathlib.Path, jid: str | None, job_plan, *, ranks: int,
             compose_only: bool) -> None:
    """Run a rendered script under bash as PBS would, with the fakes; then its gaugeflow command."""
    text = script.read_text()
    check = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, f"{eid}: {script.name} is no valid bash: {check.stderr}"
    nodes = int(re.search(r"^#PBS -l select=(\d+)", text, re.MULTILINE).group(1))
    # rank 0 runs on the node file's first host (gaugeflow checks that): this machine, then loopback aliases
    hosts = [socket.gethostname(), *[f"127.0.0.{k + 2}" for k in range(max(nodes, ranks))]]
    tag = jid or re.sub(r"\W+", "_", eid)
    nodefile = r.pbs / f"nodes-{tag}"
    nodefile.write_text("".join(h + "\n" for h in hosts[:nodes]))
    log = r.pbs / f"mpiexec-{tag}"
    env = dict(r.env, PBS_O_WORKDIR=str(r.work), PBS_NODEFILE=str(nodefile), PBS_JOBID=f"{jid or '1'}.fake-pbs",
               MPIEXEC_LOG=str(log), FAKE_MODULES=" ".join(_pinned_modules()))
    res = r.process([BASH, str(script)], env=env, label=f"{eid} (script)")
    _expect(res, f"{eid} (the job script)")
    argv = pathlib.Path(str(log) + ".args").read_text().splitlines()
    recorded = dict(kv.split("=", 1) for kv in pathlib.Path(str(log) + ".env").read_text().split("\0") if "=" in kv)
    g = argv.index("gaugeflow")
    launch, command = argv[:g], argv[g:]
    n = int(launch[launch.index("-n") + 1])
    ppn = int(launch[launch.index("--ppn") + 1])
    assert n == nodes * ppn, f"{eid}: mpiexec -n {n} on {nodes} nodes x {ppn}"
    for k in list(recorded):
        if k.startswith(("MPIEXEC_LOG", "FAKE_")):
            recorded.pop(k)
    recorded["OMP_NUM_THREADS"] = "1"  # the template's 8 threads per rank would oversubscribe 2 cores
    if compose_only:
        res = r.forked("gaugeflow", [*command[1:], "--cfg", "job"], env=recorded, label=f"{eid} (compose)")
        _expect(res, f"{eid} (composing the script's command)")
        return
    extra, env_changes, check = job_plan
    recorded = _with(recorded, env_changes)
    full = [*command[1:], *extra]
    if ranks == 1:
        check(r, r.forked("gaugeflow", full, env=recorded, label=f"{eid} (job)"))
        return
    assert shutil.which("gaugeflow", path=recorded["PATH"]), f"{eid}: no gaugeflow on the job's PATH"
    envs = []
    for rank in range(ranks):  # what PALS mpiexec exports, one rank per node here
        envs.append(dict(recorded, PMI_RANK=str(rank), PMI_SIZE=str(ranks), PMI_LOCAL_RANK="0",
                         PMI_LOCAL_SIZE="1", PALS_RANKID=str(rank), PALS_LOCAL_RANKID="0", PALS_NODEID=str(rank)))
    nodefile.write_text("".join(h + "\n" for h in hosts[:ranks]))
    results = r.ranks(full, envs, label=f"{eid} (job, {ranks} ranks)")
    for k, res in enumerate(results):
        if res.rc != 0:
            raise StepFailed(f"{eid}: rank {k} of the job: exit {res.rc}\n{res.describe()}")
    check(r, results[0])


def build_plan(cmds: list[DocCommand] = DOC_COMMANDS) -> Planner:
    p = Planner()
    for c in cmds:
        p.plan(c)
    # the venv the job scripts source: the one the Aurora README's session makes, else a bare one
    if p.venv_entry is not None:
        venv_id = p.venv_entry
    else:
        def make_venv(r: Runner):
            _expect(r.process([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", "venv"],
                              label="setup:venv"), "setup:venv")
        p.add(Entry("setup:venv-bare", "python -m venv --system-site-packages --without-pip venv", make_venv,
                    reported=False))
        venv_id = "setup:venv-bare"
    for e in p.entries:
        e.deps = [venv_id if d == "setup:venv" else d for d in e.deps if d != e.id]
    return p


def run_plan(plan: Planner, runner: Runner) -> dict[str, tuple[bool, str]]:
    """Run the entries two at a time, each once everything it needs has succeeded."""
    results: dict[str, tuple[bool, str]] = {}
    pending = list(plan.entries)
    known = {e.id for e in plan.entries}
    running: dict = {}
    with cf.ThreadPoolExecutor(WORKERS) as pool:
        while pending or running:
            for e in list(pending):
                missing = [d for d in e.deps if d not in known]
                if missing:
                    pending.remove(e)
                    results[e.id] = (False, f"{e.id}: needs {missing}, which no plan makes")
                    continue
                if all(d in results for d in e.deps):
                    pending.remove(e)
                    bad = [d for d in e.deps if not results[d][0]]
                    if bad:
                        results[e.id] = (False, f"{e.id}: not run: it needs {bad}, which failed:\n"
                                         + "\n".join(results[d][1][:3000] for d in bad))
                    else:
                        running[pool.submit(e.run, runner)] = e
            if not running:
                if pending:  # a cycle
                    for e in pending:
                        results[e.id] = (False, f"{e.id}: waits for {e.deps} in a cycle")
                    pending.clear()
                continue
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in done:
                e = running.pop(f)
                exc = f.exception()
                results[e.id] = (True, "") if exc is None else (False, str(exc))
    return results


# =============================================================================================
# the tests


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    work = tmp_path_factory.mktemp("docs")
    runner = Runner(work)
    plan = build_plan()
    import resource

    t0, c0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    results = run_plan(plan, runner)
    total, c1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = runner.forked_cpu + (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    lines = [f"{s:6.1f} s  {label}" for label, s in sorted(runner.timings, key=lambda x: -x[1])]
    summary = f"{len(plan.entries)} steps in {total:.1f} s wall, {cpu:.1f} s CPU"
    (work / "timings.txt").write_text(summary + "\n" + "\n".join(lines) + "\n")
    print(f"\ndocumented commands: {summary} (slowest: {lines[:3]}; all in {work / 'timings.txt'})")
    return results


def test_the_documents_were_read():
    readme = [c for c in DOC_COMMANDS if c.doc == "README.md"]
    assert len(readme) >= 25, [c.text for c in readme]
    for path in JOB_DOCS:
        rel = str(path.relative_to(ROOT))
        assert any(c.doc == rel for c in DOC_COMMANDS), f"no command found in {rel}"
    texts = [c.text for c in DOC_COMMANDS]
    assert any(t.startswith("gaugeflow train init_from=") for t in texts)
    assert any(t.startswith("tools/submit") for t in texts) and any(t.startswith("torchrun") for t in texts)


def test_an_unknown_span_or_program_fails_rather_than_being_skipped():
    odd = [DocCommand("x:1", "x", 1, "`frobnicate`", readme_row=True, problem="the span ..."),
           DocCommand("x:2", "x", 2, "scp a b"),
           DocCommand("x:3", "x", 3, "gaugeflow train resume=<some run>", readme_row=True)]
    plan = Planner()
    for c in odd:
        plan.plan(c)
    for e in plan.entries:
        with pytest.raises(StepFailed):
            e.run(None)


@pytest.mark.parametrize("cmd", DOC_COMMANDS, ids=[c.id for c in DOC_COMMANDS])
def test_documented_command_runs(outcomes, cmd):
    ok, message = outcomes[cmd.id]
    assert ok, f"{cmd.doc} line {cmd.line}: `{cmd.text}`" + (f" with {cmd.variant}" if cmd.variant else "") \
        + f"\n{message}"
