"""--wandb-project logs the same scalars as TensorBoard, offline (WANDB_MODE=offline): the run's
.wandb file is read back record by record and compared with the TensorBoard event file."""
import glob
import struct

import pytest

from megaflow.config import ConfigError, parse_args
from megaflow.parallel import state
from megaflow.training.trainer import pretrain
from tests.e2e.test_training import TINY


def wandb_history(run_file: str) -> dict:
    """{step: {key: value}} from an offline run file. Its layout is LevelDB's log format: a 7-byte
    header (':W&B', magic, version), then 32 KiB blocks of chunks (CRC 4 bytes, length 2, type 1:
    full/first/middle/last) whose payloads, reassembled, are wandb_internal_pb2.Record messages."""
    import json
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    block, pos, records, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:           # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        partial = payload if kind in (1, 2) else partial + payload
        if kind in (1, 4):
            records.append(partial)
            partial = b""
    history = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
            step = int(items.pop("_step", rec.history.step.num))
            history.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return history


def test_wandb_offline_logs_the_tensorboard_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        pretrain(parse_args(TINY + ["--train-iters", "3", "--eval-interval", "2", "--tensorboard-dir",
                                    str(tmp_path / "tb"), "--wandb-project", "megaflow-test",
                                    "--wandb-exp-name", "tiny", "--wandb-save-dir", str(tmp_path / "wb")]))
    finally:
        state.destroy()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tb = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            tb.setdefault(e.step, {})[tag] = e.value
    [run_file] = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    wb = wandb_history(run_file)
    assert set(wb) == set(tb) == {1, 2, 3}
    for step in tb:
        assert set(wb[step]) == set(tb[step]), step
        for tag, value in tb[step].items():   # TensorBoard stores float32
            assert wb[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)
    assert "lm loss validation" in wb[2] and "lm loss" in wb[3]


def test_wandb_flag_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="--wandb-project needs the wandb package"):
        parse_args(TINY + ["--train-iters", "1", "--wandb-project", "p"])
