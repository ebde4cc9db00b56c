"""What one message costs a deployed site: a SuperNode starts a fresh ClientApp process for every
message, so each train or evaluate message pays for the imports, the model build and the reading of
the site's caches before any work.

    .venv/bin/python -m benchmarks.site_message [--repeats 3] [--out runs/benchmarks/site_message.json]

Each repeat is a new Python process that imports the ClientApp, opens the site's session (data from
the preprocess cache, model, features from the feature cache) and handles one train and one
evaluate message through the ClientApp itself, timing each phase. The site's caches are filled once
beforehand, as after a site's first round.

Side by side, the same repeats as the site gate runs them (sitegate/gate.py): each task forked from a
warm zygote that has imported the site-installed libraries (NumPy, PyTorch, torchvision, Flower) but
no code of the app.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_result
from simulations.synthetic import SyntheticSpec, generate_clinics

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import client.app as client_app
t1 = time.perf_counter()
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from client.session import open_session
from common.config import RunConfig, SiteConfig
from common.exchange import to_array_record
from common.model import build_model, frozen_backbone_hash
site_path, run_config = sys.argv[1], json.loads(sys.argv[2])
config = RunConfig.from_mapping(run_config)
t2 = time.perf_counter()
session = open_session(config, SiteConfig.from_node_config({"data-path": site_path}, config.federation))
t3 = time.perf_counter()
def message(kind):
    model = session.model
    content = RecordDict({"arrays": to_array_record(model), "config": ConfigRecord(
        {"server-round": 1, "backbone-hash": session.backbone_hash, "budget-id": "bench"})})
    meta = Metadata(run_id=1, message_id=kind, src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=kind)
    return make_message(meta, content=content)
context = Context(run_id=1, node_id=1, node_config={"data-path": site_path}, state=RecordDict(), run_config=run_config)
reply = client_app.train(message("train"), context)
t4 = time.perf_counter()
assert reply.content["site"]["status"] == "ok", reply.content["site"]
client_app.evaluate(message("evaluate"), context)
t5 = time.perf_counter()
print(json.dumps({"import_clientapp_s": t1 - t0, "open_session_s": t3 - t2, "train_message_s": t4 - t3,
                  "evaluate_message_s": t5 - t4}))
'''

# The gate's zygote: preload, then fork each repeat; the child runs CHILD with the same argv.
FORKED = r'''
import os, sys
from sitegate.gate import preload
preload()
child = sys.argv.pop()
for _ in range(int(sys.argv.pop())):
    pid = os.fork()
    if pid == 0:
        exec(compile(child, "<child>", "exec"), {"__name__": "__child__"})
        sys.stdout.flush()
        os._exit(0)
    os.waitpid(pid, 0)
'''


def _phases(lines: str) -> list[dict]:
    return [json.loads(line) for line in lines.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--out", default="runs/benchmarks/site_message.json")
    args = parser.parse_args()
    run_config = {"image-size": 64, "seq-len": 8, "local-epochs": 1}
    phases: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        (site,) = generate_clinics(Path(tmp), SyntheticSpec(sites=1, studies_per_site=args.studies, seed=3),
                                   progress=False)
        command = [sys.executable, "-c", CHILD, str(site), json.dumps(run_config)]
        subprocess.run(command, check=True, capture_output=True, text=True)  # fills the site's caches
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            phases.append({**_phases(out)[-1], "process_total_s": time.perf_counter() - start})
        forked_out = subprocess.run([sys.executable, "-c", FORKED, str(site), json.dumps(run_config),
                                     str(args.repeats), CHILD], check=True, capture_output=True, text=True).stdout
        forked = _phases(forked_out)
    summary = {key: round(statistics.median(p[key] for p in phases), 3) for key in phases[0]}
    overhead = summary["import_clientapp_s"] + summary["open_session_s"]
    summary["fixed_overhead_per_message_s"] = round(overhead, 3)
    gate = {key: round(statistics.median(p[key] for p in forked), 3) for key in forked[0]}
    gate["fixed_overhead_per_message_s"] = round(gate["import_clientapp_s"] + gate["open_session_s"], 3)
    write_result(args.out, {"studies": args.studies, "repeats": args.repeats, "median_seconds": summary,
                            "forked_from_warm_gate_median_seconds": gate,
                            "fresh_vs_forked_overhead_ratio": round(overhead / gate["fixed_overhead_per_message_s"], 2),
                            "runs": phases, "forked_runs": forked})


if __name__ == "__main__":
    main()
