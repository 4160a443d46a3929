"""Monitoring: the wandb logger offline with no network, the id file, rank and pytest guards, failures.

Two tests start a real offline wandb run (a second or two each); the rest replace
``wandb.init`` by a recorder.
"""

import json
import pathlib
import time
from types import SimpleNamespace

import pytest

from gaugeflow.cli.common import UsageError
from gaugeflow.monitor import ID_FILE, LoggerConf, NullLogger, WandbLogger, build_logger

wandb = pytest.importorskip("wandb")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    # any accidental connection attempt fails at once instead of waiting on a route
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # keep wandb's own settings and caches out of the home directory
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.delenv("GAUGEFLOW_WANDB", raising=False)


def wandb_records(path: pathlib.Path):
    """The protobuf records of a ``run-<id>.wandb`` file (wandb's LevelDB-style log, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, block = 7, b"", 32768  # 7-byte file header; each record chunk has a 7-byte header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block tails too short for a header are padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            yield pb.Record.FromString(chunk)
            chunk = b""


def finished_records(path: pathlib.Path, timeout: float = 10.0) -> list:
    # wandb-core writes the log asynchronously: wait for the exit record
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path)) if path.exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


def png(path: pathlib.Path) -> pathlib.Path:
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (4, 3), (200, 10, 10)).save(path)
    return path


def test_offline_run_logs_everything_without_network(tmp_path, no_network, capsys):
    run_dir = tmp_path / "run"
    image = png(tmp_path / "plaquette.png")
    t0 = time.monotonic()
    logger = build_logger({"name": "wandb", "tags": ["u1"]}, run_dir, {"theory": {"beta": 2.0}}, force=True)
    assert isinstance(logger, WandbLogger) and logger.active
    with logger:
        logger.log_metrics({"loss": 1.5, "ess": 0.25}, step=10)
        logger.log_metrics({"loss": 1.25, "ess": 0.5}, step=20)
        logger.log_config({"train": {"steps": 20}})
        logger.log_images({"plaquette": image})
        logger.log_summary({"log_z": -3.5, "stop_reason": "completed"})
    assert not logger.active
    run_id = logger.run_id
    assert (run_dir / ID_FILE).read_text().strip() == run_id
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = finished_records(offline / f"run-{run_id}.wandb")
    assert time.monotonic() - t0 < 15

    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "run" in kinds and "exit" in kinds
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.project == "gaugeflow" and run.display_name == "run"
    assert list(run.tags) == ["u1"]
    rows = history(records)
    assert [(r["_step"], r["loss"], r["ess"]) for r in rows if "loss" in r] == [(10, 1.5, 0.25), (20, 1.25, 0.5)]
    assert any("plaquette/path" in r for r in rows)  # the image went into the row of the last step
    assert list((offline / "files" / "media" / "images").glob("plaquette_*.png"))
    config = {}
    for r in records:
        items = r.run.config.update if r.WhichOneof("record_type") == "run" else (
            r.config.update if r.WhichOneof("record_type") == "config" else [])
        config.update({i.key: json.loads(i.value_json) for i in items})
    assert config["theory"] == {"beta": 2.0} and config["train"] == {"steps": 20}
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    assert summary["log_z"] == -3.5 and summary["stop_reason"] == "completed"
    exit_record = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit_code == 0
    err = capsys.readouterr().err
    assert f"wandb sync {offline}" in err and "warning" not in err


def test_resume_reuses_id_file_and_failure_sets_exit_code(tmp_path, no_network):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ID_FILE).write_text("gfresume7\n")
    with pytest.raises(RuntimeError, match="diverged"):
        with build_logger({"name": "wandb", "run_name": "resumed"}, run_dir, {}, force=True) as logger:
            assert logger.run_id == "gfresume7"
            logger.log_metrics({"loss": 0.5}, step=1001)
            raise RuntimeError("diverged")
    (offline,) = (run_dir / "wandb").glob("offline-run-*-gfresume7")
    records = finished_records(offline / "run-gfresume7.wandb")
    exit_record = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit_code == 1
    assert (run_dir / ID_FILE).read_text().strip() == "gfresume7"


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.id, self.calls = kwargs, kwargs["id"], []
        self.dir = str(pathlib.Path(kwargs["dir"]) / "wandb" / f"offline-run-x-{self.id}" / "files")
        self.url, self.disabled = None, False
        self.config = SimpleNamespace(update=lambda d, **kw: self.calls.append(("config", d, kw)))
        self.summary = SimpleNamespace(update=lambda d: self.calls.append(("summary", d)))

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


@pytest.fixture
def fake_init(monkeypatch, no_network):
    runs = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


def test_init_arguments_ids_and_mode_resolution(tmp_path, fake_init, monkeypatch):
    cfg = {"name": "wandb", "project": "p", "entity": "team", "group": "g", "tags": ["a", "b"]}
    build_logger(cfg, tmp_path / "r1", {"seed": 1}, job_type="train", force=True)
    kw = fake_init[-1].kwargs
    assert (kw["project"], kw["entity"], kw["group"], kw["tags"]) == ("p", "team", "g", ["a", "b"])
    assert kw["job_type"] == "train"
    assert kw["name"] == "r1" and kw["dir"] == str(tmp_path / "r1") and kw["config"] == {"seed": 1}
    assert kw["mode"] == "offline" and kw["resume"] is None  # from WANDB_MODE=offline
    assert kw["settings"].console == "off" and kw["settings"].init_timeout == 60.0
    first_id = kw["id"]
    assert (tmp_path / "r1" / ID_FILE).read_text().strip() == first_id

    # a second invocation in the same run directory continues the same wandb run
    build_logger(cfg, tmp_path / "r1", {}, force=True)
    assert fake_init[-1].kwargs["id"] == first_id and fake_init[-1].kwargs["resume"] == "allow"
    # a job's DictConfig arrives resolved, as plain containers
    from omegaconf import OmegaConf

    build_logger(OmegaConf.create(cfg), tmp_path / "r1", OmegaConf.create({"a": "${b}", "b": 2}), force=True)
    assert fake_init[-1].kwargs["config"] == {"a": 2, "b": 2}
    # logger.resume_id wins over the file; logger.dir moves wandb's files, not the id file
    build_logger({**cfg, "resume_id": "explicit1", "dir": str(tmp_path / "elsewhere")}, tmp_path / "r1", {}, force=True)
    kw = fake_init[-1].kwargs
    assert kw["id"] == "explicit1" and kw["resume"] == "allow" and kw["dir"] == str(tmp_path / "elsewhere")
    assert (tmp_path / "r1" / ID_FILE).read_text().strip() == "explicit1"
    assert not list((tmp_path / "r1").glob(".*tmp"))  # the atomic write left no temporary behind

    for env, expected in (("online", "online"), ("dryrun", "offline"), (None, "offline")):
        if env is None:
            monkeypatch.delenv("WANDB_MODE")
        else:
            monkeypatch.setenv("WANDB_MODE", env)
        build_logger(LoggerConf(name="wandb"), tmp_path / "r2", {}, force=True)
        assert fake_init[-1].kwargs["mode"] == expected
    build_logger({"name": "wandb", "mode": "offline"}, tmp_path / "r2", {}, force=True)
    assert fake_init[-1].kwargs["mode"] == "offline"


def test_calls_reach_the_run_and_exceptions_finish_it_failed(tmp_path, fake_init):
    image = png(tmp_path / "a.png")
    with pytest.raises(KeyError):
        with build_logger({"name": "wandb"}, tmp_path / "r", {}, force=True) as logger:
            logger.log_metrics({"loss": 2.0}, step=5)
            logger.log_config({"x": 1})
            logger.log_summary({"ess": 0.5})
            logger.log_images({"a": image})
            raise KeyError("boom")
    calls = fake_init[-1].calls
    assert calls[0] == ("log", {"loss": 2.0}, 5)
    assert calls[1] == ("config", {"x": 1}, {"allow_val_change": True})
    assert calls[2] == ("summary", {"ess": 0.5})
    assert calls[3][0] == "log" and isinstance(calls[3][1]["a"], wandb.Image) and calls[3][2] == 5
    assert calls[4:] == [("finish", 1)]
    logger.finish()  # a second finish is harmless and reaches nothing
    logger.log_metrics({"loss": 1.0}, step=6)
    assert len(calls) == 5


def test_disabled_mode_and_other_ranks_write_nothing(tmp_path, fake_init):
    for logger in (build_logger({"name": "wandb", "mode": "disabled"}, tmp_path / "a", {}, force=True),
                   build_logger({"name": "wandb", "mode": "offline"}, tmp_path / "b", {}, rank=1, force=True),
                   build_logger({"name": "none"}, tmp_path / "c", {}, force=True),
                   build_logger(None, tmp_path / "d", {})):
        assert isinstance(logger, NullLogger) and not logger.active
        with logger:
            logger.log_metrics({"loss": 1.0}, step=1)
            logger.log_summary({"ess": 1.0})
    assert fake_init == [] and list(tmp_path.iterdir()) == []


def test_pytest_and_gaugeflow_wandb_force_disabled_unless_forced(tmp_path, fake_init, monkeypatch):
    assert isinstance(build_logger({"name": "wandb", "mode": "offline"}, tmp_path / "a", {}), NullLogger)
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setenv("GAUGEFLOW_WANDB", "disabled")
    assert isinstance(build_logger({"name": "wandb", "mode": "online"}, tmp_path / "b", {}), NullLogger)
    assert fake_init == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    monkeypatch.delenv("GAUGEFLOW_WANDB")
    assert isinstance(build_logger({"name": "wandb"}, tmp_path / "c", {}), WandbLogger)


@pytest.mark.parametrize("cfg, key", [
    ({"name": "tensorboard"}, "logger.name"),
    ({"name": "wandb", "mode": "cloud"}, "logger.mode"),
    ({"name": "wandb", "projcet": "x"}, "logger.projcet"),
    ({"name": "wandb", "tags": "a,b"}, "logger.tags"),
    ({"name": "wandb", "resume_id": "a/b"}, "logger.resume_id"),
    ({"name": "wandb", "init_timeout": 0}, "logger.init_timeout"),
])
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path, fake_init, cfg, key):
    # checked on every rank, so a typo fails everywhere
    with pytest.raises(UsageError, match=key.replace(".", r"\.")) as err:
        build_logger(cfg, tmp_path, {}, rank=3, force=True)
    assert "\n" not in str(err.value)


def test_bad_wandb_mode_env_is_a_usage_error(tmp_path, fake_init, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UsageError, match="WANDB_MODE"):
        build_logger({"name": "wandb"}, tmp_path, {}, force=True)


def test_init_failure_falls_back_with_one_warning(tmp_path, no_network, monkeypatch, capsys):
    def broken_init(**kwargs):
        raise wandb.errors.CommError("network is unreachable\nlong traceback text")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = build_logger({"name": "wandb"}, tmp_path / "r", {}, force=True)
    assert isinstance(logger, NullLogger)
    with logger:
        logger.log_metrics({"loss": 1.0}, step=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: wandb did not start") and "unreachable" in err[0]
    assert not (tmp_path / "r" / ID_FILE).exists()

    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # wandb not installed
    assert isinstance(build_logger({"name": "wandb"}, tmp_path / "r", {}, force=True), NullLogger)
    assert "cannot be imported" in capsys.readouterr().err


def test_logging_failure_mid_run_warns_once_and_continues(tmp_path, fake_init, capsys):
    logger = build_logger({"name": "wandb"}, tmp_path / "r", {}, force=True)
    run = fake_init[-1]

    def broken_log(*args, **kwargs):
        raise OSError("disk full")

    run.log = broken_log
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_metrics({"loss": 1.0}, step=2)
    logger.log_images({"missing": tmp_path / "none.png"})
    logger.finish()
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("warning")] == [
        "warning: wandb log failed (OSError: disk full); continuing without wandb"]
    assert run.calls == [("finish", 0)]  # after the failure only finish still reaches the run


def test_progress_bar_silent_on_other_ranks(monkeypatch, capsys):
    import rich.progress

    from gaugeflow.cli.progress import progress_bar

    class NoBar:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a bar was drawn")

    monkeypatch.setattr(rich.progress, "Progress", NoBar)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    with progress_bar(True, 10, "train", rank=1) as bar:
        bar.advance("F=1.0 ess=0.5")
    with progress_bar(False, 10, "train") as bar:
        bar.advance()
    assert capsys.readouterr().out == ""
    with pytest.raises(AssertionError, match="drawn"):  # rank 0 on a terminal does draw
        with progress_bar(True, 10, "train"):
            pass
