"""Settings that would poison or exhaust a run are refused, naming the setting: nan and inf in every
float setting, from the command line, a TOML file, a run's config.json or a dataclass built in
code; a size past its bound (token_budget, pairs_per_batch, ...); text longer than a path; a
settings file larger than the most read of it. And parallel.timeout, which bounds how long a rank
waits for the others, reaches the process group."""
import dataclasses
import datetime
import json
import math
import typing

import pytest

from moca import cli, parallel
from moca.config import MAX_TEXT, SECTIONS, Config, CptConfig, ParallelConfig, describe
from moca.files import MAX_READ_BYTES

FLOATS = [f"{section}.{f.name}" for section in SECTIONS for f in dataclasses.fields(getattr(Config(), section))
          if typing.get_type_hints(type(getattr(Config(), section)))[f.name] is float]
BOUNDED = {f"{section}.{f.name}": f.metadata["most"] for section in SECTIONS
           for f in dataclasses.fields(getattr(Config(), section)) if f.metadata["most"] is not None}


def test_every_float_setting_is_checked():
    assert set(FLOATS) == {f"{stage}.{name}" for stage in ("cpt", "cl")
                           for name in ("lr", "weight_decay", "warmup_ratio", "grad_clip")} | {
        "cpt.mlm_ratio", "cpt.mae_ratio", "cpt.mae_weight", "cl.temperature", "parallel.timeout"}


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_nan_and_inf_are_refused_on_the_command_line(name, value):
    with pytest.raises(ValueError, match=rf"^{name} takes a finite number, got (nan|inf|-inf)$"):
        Config().update({name: value})


def test_nan_and_inf_are_refused_in_toml_config_json_and_code(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[cpt]\nlr = inf\n[cl]\ngrad_clip = nan\n")
    with pytest.raises(ValueError, match=r"^cpt\.lr takes a finite number, got inf$"):
        Config.from_toml(str(path))
    saved = Config().to_dict()
    saved["cl"]["temperature"] = math.nan
    (tmp_path / "config.json").write_text(json.dumps(saved))  # json writes NaN, and Python reads it back
    with pytest.raises(ValueError, match=rf"^{tmp_path}/config.json: cl\.temperature takes a finite number, got nan$"):
        Config.read(str(tmp_path))
    with pytest.raises(ValueError, match=r"^cpt\.mae_weight takes a finite number, got inf$"):
        Config(cpt=CptConfig(mae_weight=math.inf)).validate()
    with pytest.raises(ValueError, match=r"^parallel\.timeout takes a finite number, got nan$"):
        Config(parallel=ParallelConfig(timeout=math.nan)).validate()


def test_sizes_past_their_bounds_are_refused():
    assert BOUNDED == {"run.keep_checkpoints": 10_000, "data.token_budget": 1 << 20, "data.max_pixels": 8192 * 8192,
                       "data.cache_bytes": 1 << 42, "data.prefetch": 64, "data.workers": 256,
                       "data.index_workers": 1024, "cpt.grad_accum": 4096,
                       "cl.pairs_per_batch": 1 << 16, "cl.hard_negatives": 1024, "parallel.timeout": 24 * 3600}
    shown = {line.split(" (")[0].strip(): line for line in describe().splitlines()}
    for name, most in BOUNDED.items():
        assert f"; at most {most:,}" in shown[name]  # moca train --help says it
        Config().update({name: str(most)}).validate()  # the bound itself is taken
        with pytest.raises(ValueError, match=rf"^{name} takes at most {most:,}, got {most + 1:,}"):
            Config().update({name: str(most + 1)}).validate()


def test_text_longer_than_a_path_is_refused(tmp_path):
    Config().update({"out": "x" * MAX_TEXT}).validate()
    with pytest.raises(ValueError, match=rf"^run\.out takes at most {MAX_TEXT} characters, got {MAX_TEXT + 1:,}$"):
        Config().update({"out": "x" * (MAX_TEXT + 1)}).validate()
    # a TOML list setting is bounded whole, before it is split into names
    path = tmp_path / "run.toml"
    path.write_text(f"[run]\nreport_to = {json.dumps(['tensorboard'] * 1000)}\n")
    with pytest.raises(ValueError, match=r"^run\.report_to takes at most 4096 characters, got 11,999$"):
        Config.from_toml(str(path)).validate()


def test_settings_files_larger_than_the_most_read_are_refused(tmp_path):
    path = tmp_path / "run.toml"
    with open(path, "w") as f:  # valid TOML, all comment
        f.write(("#" * 1023 + "\n") * (MAX_READ_BYTES // 1024) + "#\n")
    with pytest.raises(ValueError, match=rf"^--config {path} is larger than {MAX_READ_BYTES:,} bytes"):
        Config.from_toml(str(path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(Config().to_dict()) + " " * MAX_READ_BYTES)
    with pytest.raises(ValueError, match=rf"^settings {run}/config.json is larger than {MAX_READ_BYTES:,} bytes"):
        Config.read(str(run))


def test_the_timeout_setting():
    assert Config().parallel.timeout == 600  # NCCL's default; gloo's 30 minutes would hold every rank that long
    config = Config().update({"timeout": "30"})  # its bare name
    assert config.parallel.timeout == 30.0 and Config().result_differences(config) == []  # may change on resume
    for bad in ("0", "-5"):
        with pytest.raises(ValueError, match=rf"^parallel\.timeout must be positive \(seconds\), got {float(bad)}$"):
            Config().update({"parallel.timeout": bad}).validate()
    args = cli.parse(["train", "--stage", "cpt", "parallel.timeout=45"])[0]
    assert cli.train_config(args).parallel.timeout == 45.0


def test_the_timeout_reaches_the_process_group(monkeypatch):
    import torch
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    parallel.environment(42.5)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    assert calls == [((backend,), {"timeout": datetime.timedelta(seconds=42.5)})]
