"""The plain and lean reference recipes (benchmarks/rounds.py runs them beside clinicfl).

Both train clinicfl's model (InjuryNet, frozen ResNet50, the same head and local loop) on the same
synthetic DICOM sites, with Flower's own FedAvg and ``Strategy.start``: by default the model of
clinicfl's default configuration, severity and reconstruction heads included (``heads = false``:
without them), so that an arm and clinicfl train the same network. They differ from each other
only in what clinicfl optimises:
- plain: the whole state dict (333 tensors, frozen ResNet50 included) travels every way, and each
  batch goes through the ResNet50;
- lean: only the trainable parameters travel, and each site encodes its images once.
Every message's payload is counted the way clinicfl counts it (common.exchange.payload_bytes).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from common.config import DataConfig, ModelConfig, SharedConfig, TrainConfig, simulated_site_path
from common.data.site import load_site
from common.exchange import payload_bytes, trainable_state
from common.inference import SiteInputs, fit_feature_norm, pick_device, prepare_inputs
from common.model import build_model
from common.training import train_local

client = ClientApp()
server = ServerApp()


def _configs(run_config) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    size, steps, heads = int(run_config["image-size"]), int(run_config["seq-len"]), bool(run_config["heads"])
    shared = SharedConfig(image_size=size, seq_len=steps)
    return (ModelConfig(shared, severity_head=heads, recon_head=heads),
            DataConfig(shared), TrainConfig(shared, local_epochs=int(run_config["local-epochs"])))


@lru_cache(maxsize=64)
def _site(recipe: str, data_root: str, partition: int, image_size: int, seq_len: int, epochs: int, heads: bool):
    model_config, data_config, _ = _configs({"image-size": image_size, "seq-len": seq_len, "local-epochs": epochs,
                                             "heads": heads})
    data = load_site(simulated_site_path(data_root, partition), data_config, 1, progress=False)
    model = build_model(model_config)
    device = pick_device()
    if recipe == "lean":
        inputs = prepare_inputs(model, data, None, device)  # encoded once, kept in memory
    else:
        images = torch.from_numpy(data.images).unsqueeze(2)
        inputs = SiteInputs(images, torch.from_numpy(data.mask), torch.from_numpy(data.labels), False, images,
                            torch.from_numpy(data.targets))
    fit_feature_norm(model, inputs, data.train_index, device)
    return data, model, inputs, device


def _load(model, arrays: ArrayRecord, recipe: str) -> None:
    values = {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}
    if recipe == "plain":
        model.load_state_dict(values, strict=True)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)


def _arrays(model, recipe: str) -> ArrayRecord:
    state = model.state_dict() if recipe == "plain" else trainable_state(model)
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})


def _open(context: Context):
    rc = context.run_config
    return _site(str(rc["recipe"]), str(rc["data-root"]), int(context.node_config["partition-id"]),
                 int(rc["image-size"]), int(rc["seq-len"]), int(rc["local-epochs"]), bool(rc["heads"]))


@client.train()
def train(msg: Message, context: Context) -> Message:
    recipe = str(context.run_config["recipe"])
    data, model, inputs, device = _open(context)
    _load(model, msg.content["arrays"], recipe)
    result = train_local(model, inputs, data.train_index, _configs(context.run_config)[2], device)
    return Message(RecordDict({"arrays": _arrays(model, recipe),
                               "metrics": MetricRecord({"num-examples": result.num_examples,
                                                        "train-loss": result.loss})}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    recipe = str(context.run_config["recipe"])
    data, model, inputs, device = _open(context)
    _load(model, msg.content["arrays"], recipe)
    from common.inference import predict

    index = data.test_index
    probs = predict(model, inputs, index, device).probs[:, 0].numpy()
    labels = data.labels[index, 0]
    loss = float(-np.mean(labels * np.log(np.clip(probs, 1e-7, 1)) + (1 - labels) * np.log(np.clip(1 - probs, 1e-7, 1))))
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(index), "loss": loss,
                                                        "accuracy": float(np.mean((probs >= 0.5) == labels))})}),
                   reply_to=msg)


class CountingGrid(Grid):
    """The simulation's grid, counting each message's payload and timing each exchange."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.sent, self.received = grid, 0, 0

    def set_run(self, run):
        return self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs):
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += sum(payload_bytes(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.received += sum(payload_bytes(m) for m in replies)
        return replies


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    recipe = str(rc["recipe"])
    model_config, _, _ = _configs(rc)
    model = build_model(model_config)
    counting = CountingGrid(grid)
    nodes = len(list(grid.get_node_ids()))
    ends: list[float] = []
    strategy = FedAvg(min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes)
    start = time.perf_counter()

    def mark(server_round: int, arrays: ArrayRecord):
        ends.append(time.perf_counter() - start)
        return None

    strategy.start(grid=counting, initial_arrays=_arrays(model, recipe), num_rounds=int(rc["num-rounds"]),
                   evaluate_fn=mark)
    rounds = [b - a for a, b in zip(ends, ends[1:])]
    result = {"recipe": recipe, "round_seconds": rounds, "sites": nodes,
              "bytes_per_site_per_round": (counting.sent + counting.received) / max(nodes, 1) / int(rc["num-rounds"])}
    Path(str(rc["result-path"])).write_text(json.dumps(result))
