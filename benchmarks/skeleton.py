"""Benchmark of the training path and calibration of the synthetic task, in one run.

    .venv/bin/python -m benchmarks.skeleton [--out runs/benchmarks/skeleton.json]

Reports, side by side:
- local epoch time with features cached once per site vs. the naive recipe that pushes every
  image through the frozen ResNet50 in every batch (same data, same head, same machine);
- bytes per round per direction: trainable parameters only vs. the full state dict;
- the task's difficulty: a centralised model trained on the pooled clinics (the reference a
  federated run is compared with; the synthetic default aims at AUC 0.85-0.95, not 1.0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.training import train_local
from benchmarks import write_result
from common.config import DataConfig, EvalConfig, ModelConfig, SharedConfig, TrainConfig
from common.inference import SiteInputs, encode, evaluate_local, fit_feature_norm
from common.data.site import SiteData, load_site
from common.exchange import trainable_state
from common.metrics.classification import summarize
from common.model import build_model
from simulations.synthetic import SyntheticSpec, generate_clinics


def pooled_site(sites: list[SiteData]) -> SiteData:
    return SiteData(
        studies=[f"{i}/{s}" for i, site in enumerate(sites) for s in site.studies],
        images=np.concatenate([s.images for s in sites]), mask=np.concatenate([s.mask for s in sites]),
        labels=np.concatenate([s.labels for s in sites]), targets=np.concatenate([s.targets for s in sites]),
        is_test=np.concatenate([s.is_test for s in sites]), label_names=sites[0].label_names)


def epoch_times(data: SiteData, model_config: ModelConfig, train: TrainConfig, device: torch.device) -> dict:
    model = build_model(model_config)
    images, mask = torch.from_numpy(data.images).unsqueeze(2), torch.from_numpy(data.mask)
    labels = torch.from_numpy(data.labels)
    one_epoch = replace(train, local_epochs=1)

    start = time.perf_counter()
    features = encode(model, images, mask, device)
    encode_seconds = time.perf_counter() - start
    cached = SiteInputs(features, mask, labels, True, images)
    fit_feature_norm(model, cached, data.train_index, device)
    cached_seconds = train_local(model, cached, data.train_index, one_epoch, device).seconds

    naive = SiteInputs(images, mask, labels, False, images)
    naive_seconds = train_local(model, naive, data.train_index, one_epoch, device).seconds
    return {"encode_once_s": round(encode_seconds, 3), "epoch_cached_features_s": round(cached_seconds, 4),
            "epoch_encode_every_batch_s": round(naive_seconds, 3),
            "speedup_per_epoch": round(naive_seconds / cached_seconds, 1)}


def traffic(model_config: ModelConfig) -> dict:
    model = build_model(model_config)
    trainable = sum(t.numel() * t.element_size() for t in trainable_state(model).values())
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"trainable_bytes": trainable, "full_state_dict_bytes": full, "ratio": round(trainable / full, 4)}


def centralised_auc(data: SiteData, model_config: ModelConfig, train: TrainConfig, device: torch.device,
                    epochs: int) -> dict:
    model = build_model(model_config)
    images = torch.from_numpy(data.images).unsqueeze(2)
    inputs = SiteInputs(encode(model, images, torch.from_numpy(data.mask), device), torch.from_numpy(data.mask),
                        torch.from_numpy(data.labels), True, images, torch.from_numpy(data.targets))
    fit_feature_norm(model, inputs, data.train_index, device)
    curve = []
    for epoch in range(epochs):
        train_local(model, inputs, data.train_index, replace(train, local_epochs=1), device, server_round=epoch)
        curve.append(round(summarize(evaluate_local(model, inputs, data.test_index, device, EvalConfig()).classification)["auc"], 4))
    return {"test_auc_final": curve[-1], "test_auc_best": max(curve), "test_auc_curve": curve,
            "n_train": int(len(data.train_index)), "n_test": int(len(data.test_index))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/benchmarks/skeleton.json")
    parser.add_argument("--studies-per-site", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lesion-contrast", type=float, default=SyntheticSpec.lesion_contrast)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = SyntheticSpec(sites=3, studies_per_site=args.studies_per_site, lesion_contrast=args.lesion_contrast)
    shared = SharedConfig(image_size=spec.image_size, seq_len=spec.slices_per_study)
    model_config, data_config, train = ModelConfig(shared), DataConfig(shared), TrainConfig(shared)
    with tempfile.TemporaryDirectory() as tmp:
        sites = generate_clinics(Path(tmp), spec)
        pooled = pooled_site([load_site(s, data_config, 1) for s in sites])
    first_site = SiteData(pooled.studies[:spec.studies_per_site], pooled.images[:spec.studies_per_site],
                          pooled.mask[:spec.studies_per_site], pooled.labels[:spec.studies_per_site],
                          pooled.targets[:spec.studies_per_site], pooled.is_test[:spec.studies_per_site],
                          pooled.label_names)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "synthetic_spec": spec.__dict__,
        "local_epoch_one_site": epoch_times(first_site, model_config, train, device),
        "traffic_per_round_per_direction": traffic(model_config),
        "centralised_reference": centralised_auc(pooled, model_config, train, device, args.epochs),
    }
    write_result(args.out, result, hide=("synthetic_spec",))


if __name__ == "__main__":
    main()
