"""clinicfl-server: the coordinating centre's commands.

    clinicfl-server certs --host NAME_OR_IP ... --site NAME ...   CA, server certificate, site keys
    clinicfl-server start [--address 0.0.0.0:9092] [--insecure]   the SuperLink (TLS + node auth)
    clinicfl-server register-site NAME PUBKEY                      allow a site's key to connect
    clinicfl-server sites                                          registered sites, online or not
    clinicfl-server bundle [--out FILE]                            the app bundle's sha256, for sites to approve
    clinicfl-server run [--rounds N --min-sites N --set k=v ...]   start a federation; prints the run id
    clinicfl-server status [RUN | RUN_DIR]                         runs, or one run's per-round table
    clinicfl-server logs RUN | stop RUN | pause RUN | continue RUN
    clinicfl-server resume RUN [--rounds N]                        continue RUN from its last finished round
    clinicfl-server export RUN [--round N] [--out FILE] [--use F]  the global model and its model card
    clinicfl-server report RUN | RUN_DIR                           PNG plots
    clinicfl-server shutdown                                       stop the SuperLink

Every command works on one centre folder: --home, or $CLINICFL_HOME, or ./centre.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.table import Table

from common.config import AGGREGATIONS, RunConfig
from common.processes import absolute_paths, parse_assignments, write_config_file
from sitegate.approvals import bundle_hash, project_bundle
from server.centre import CONNECTION, PROJECT_ROOT, Centre, CentreError, flwr, key_fingerprint, parse_json_output, \
    running_superlink, start_superlink, stop_superlink
from common.rundir import ENDED_STATES, RunDirectory
from server.runs import print_status, record_stop, wide_console
from server.identities import RegistryError, SiteIdentities


def _centre(args: argparse.Namespace) -> Centre:
    return Centre(Path(args.home).expanduser().resolve())


def _run_dir(args: argparse.Namespace, value: str) -> RunDirectory:
    """A run id (through the centre) or a run directory path."""
    return RunDirectory.open(_centre(args).run_dir(int(value)) if value.isdigit() else Path(value))


def cmd_certs(args: argparse.Namespace) -> int:
    from server.certs import create_ca, create_server_certificate, create_site_keys

    centre = _centre(args)
    issued = []
    if not (centre.certs / "ca.crt").is_file() or args.new_ca:
        issued += create_ca(centre.certs)
    if args.host or not (centre.certs / "server.crt").is_file():
        # The centre's own CLI connects over loopback: localhost and 127.0.0.1 are always included.
        hosts = list(dict.fromkeys([*args.host, "localhost", "127.0.0.1"]))
        issued += create_server_certificate(centre.certs, hosts)
    for site in args.site:
        issued += create_site_keys(centre.sites, site)
    table = Table(title=f"issued in {centre.home}")
    for column in ("file", "mode", "goes to"):
        table.add_column(column)
    for item in issued:
        table.add_row(str(item.path.relative_to(centre.home)), "0600 secret" if item.secret else "0644", item.goes_to)
    wide_console().print(table)
    print("Each site needs: certs/ca.crt and its own sites/<name>.key. Register the public key with "
          "clinicfl-server register-site NAME sites/NAME.pub")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    centre = _centre(args)
    host, _, port = args.address.rpartition(":")
    if args.insecure:
        print("WARNING: --insecure: no TLS and no site authentication. Model updates travel in clear and any "
              "process that reaches the port can join. Use only on a closed test network.", file=sys.stderr)
    state = start_superlink(centre, host or "0.0.0.0", int(port), args.insecure)
    print(f"SuperLink running: pid {state['pid']}, {host}:{port} ({'INSECURE' if args.insecure else 'TLS, node auth'})")
    print(f"  database {centre.superlink / 'state.db'}\n  log      {centre.log_file}")
    print(f"  sites connect to <this host>:{port} with certs/ca.crt; open only this port (TCP) in the firewall")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    pid = stop_superlink(_centre(args))
    print(f"SuperLink (pid {pid}) stopped" if pid else "no SuperLink of this centre is running")
    return 0


def cmd_register_site(args: argparse.Namespace) -> int:
    centre = _centre(args)
    public_key = Path(args.pubkey)
    fingerprint = key_fingerprint(public_key)
    sites = centre.registered_sites()
    if args.name in sites:
        raise CentreError(f"site {args.name} is already registered (node {sites[args.name]['node-id']})")
    result = flwr(centre, "supernode", "register", str(public_key.resolve()), CONNECTION, "--name", args.name,
                  "--format", "json")
    payload = parse_json_output(result, f"registering {args.name}")
    sites[args.name] = {"node-id": str(payload.get("node-id")), "fingerprint": fingerprint,
                        "registered": time.strftime("%Y-%m-%d %H:%M:%S")}
    centre.registry.write_text(json.dumps(sites, indent=2))
    print(f"site {args.name} registered: node {payload.get('node-id')}, key {fingerprint}")
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    centre = _centre(args)
    nodes = {}
    if running_superlink(centre):
        payload = parse_json_output(flwr(centre, "supernode", "list", CONNECTION, "--format", "json"), "listing sites")
        nodes = {str(n["node-id"]): n for n in payload.get("nodes", [])}
    rows = []
    for name, site in sorted(centre.registered_sites().items()):
        node = nodes.get(site["node-id"], {})
        rows.append({"site": name, "node-id": site["node-id"],
                     "status": node.get("status", "superlink down" if not nodes else "unknown"),
                     "online-at": node.get("online-at", ""), "key": site["fingerprint"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="registered sites")
    for column in ("site", "node", "status", "online since", "key"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["site"], row["node-id"], row["status"], row["online-at"], row["key"])
    wide_console().print(table)
    return 0


def run_overrides(args: argparse.Namespace, centre: Centre) -> dict[str, object]:
    values: dict[str, object] = {"run-dir": str(centre.runs), "site-registry": str(centre.registry)}
    for flag, key in (("rounds", "num-rounds"), ("min_sites", "min-sites"), ("local_epochs", "local-epochs"),
                      ("aggregation", "aggregation"), ("dp_epsilon", "dp-target-epsilon"),
                      ("round_timeout", "round-timeout")):
        if getattr(args, flag, None) is not None:
            values[key] = getattr(args, flag)
    if getattr(args, "dp", False):
        values["dp-enabled"] = True
    if getattr(args, "secure_aggregation", False):
        values["secure-aggregation"] = True
    values.update(parse_assignments(args.set))
    return absolute_paths(values)


def submit_run(centre: Centre, values: dict[str, object], app: Path = PROJECT_ROOT) -> int:
    RunConfig.from_mapping(values)  # a bad or incompatible setting is refused here, in one line
    registry = values.get("site-registry")
    if registry:
        try:
            SiteIdentities.from_registry(Path(str(registry)))  # the ServerApp would stop on it
        except RegistryError as exc:
            raise CentreError(str(exc)) from None
    if running_superlink(centre) is None:
        raise CentreError("the SuperLink is not running: clinicfl-server start")
    digest = bundle_hash(project_bundle(app))
    # Sites run only bundles they approved: this is the hash they must have on their list.
    print(f"app bundle sha256 {digest} ({app})", file=sys.stderr)
    result = flwr(centre, "run", str(app), CONNECTION, "--format", "json", "--run-config",
                  str(write_config_file(values, centre.flwr_home / f"run-config-{time.time_ns()}.toml")), timeout=300)
    payload = parse_json_output(result, "starting the run")
    return int(payload["run-id"])


def cmd_run(args: argparse.Namespace) -> int:
    centre = _centre(args)
    run_id = submit_run(centre, run_overrides(args, centre), Path(args.app).resolve() if args.app else PROJECT_ROOT)
    print(run_id)
    print(f"run {run_id} started; follow it with: clinicfl-server status {run_id}  |  clinicfl-server logs {run_id}",
          file=sys.stderr)
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Build the app bundle the centre ships, print its hash, optionally write it for the sites."""
    app = Path(args.app).resolve() if args.app else PROJECT_ROOT
    data = project_bundle(app)
    if args.out:
        Path(args.out).write_bytes(data)
    print(bundle_hash(data))
    print(f"app bundle of {app}: {len(data)} bytes" + (f", written to {args.out}" if args.out else "")
          + "; sites approve it with clinicfl-client approve BUNDLE.fab --state-dir DIR", file=sys.stderr)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    centre = _centre(args)
    previous = _run_dir(args, args.run)
    values = {**previous.config(), **run_overrides(args, centre), "resume-from": str(previous.path.resolve())}
    run_id = submit_run(centre, values)
    print(run_id)
    print(f"run {run_id} continues {previous.name}; clinicfl-server status {run_id}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.run is None:
        return _list_runs(_centre(args))
    print_status(_run_dir(args, args.run), wide_console())
    return 0


def _list_runs(centre: Centre) -> int:
    payload = parse_json_output(flwr(centre, "ls", CONNECTION, "--format", "json"), "listing runs")
    table = Table(title="runs")
    for column in ("run", "status", "elapsed", "run directory", "state", "last round"):
        table.add_column(column, no_wrap=True)
    for run in payload.get("runs", []):
        run_id = int(run["run-id"])
        try:
            run_dir = RunDirectory(centre.run_dir(run_id))
            state = run_dir.state()
            last_round = state.get("last-round")
            name, progress, last = run_dir.name, state.get("state", "-"), "-" if last_round is None else str(last_round)
        except CentreError:
            name, progress, last = "-", "-", "-"
        table.add_row(str(run_id), str(run.get("status", "")), str(run.get("elapsed", "")), name, progress, last)
    wide_console().print(table)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    result = flwr(_centre(args), "log", str(args.run), CONNECTION, "--show")
    sys.stdout.write(result.stdout)
    return 0 if result.returncode == 0 else 2


def cmd_stop(args: argparse.Namespace) -> int:
    centre = _centre(args)
    try:  # a paused run is waiting on its flag: let it end cleanly as well
        run: RunDirectory | None = RunDirectory(centre.run_dir(int(args.run)))
        run.set_control("stop")
    except CentreError:
        run = None
    try:
        parse_json_output(flwr(centre, "stop", str(args.run), CONNECTION, "--format", "json"), f"stopping run {args.run}")
    except CentreError:
        # A paused run sees the flag and ends by itself, and Flower then refuses to stop a finished
        # run: that is the stop asked for. Anything else is an error.
        if run is None or run.state().get("state") not in ENDED_STATES:
            raise
    if run is not None:
        record_stop(run, "stopped by the coordinating centre")
    print(f"run {args.run} stopped; continue it later with clinicfl-server resume {args.run}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    _run_dir(args, args.run).set_control("paused")
    print(f"run {args.run} will pause after its current round (clinicfl-server continue {args.run} to go on)")
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    _run_dir(args, args.run).set_control("running")
    print(f"run {args.run} continues")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from server.export import export_model
    from server.model_card import IntendedUse, card_paths

    try:
        use = IntendedUse.load(Path(args.use) if args.use else None)
    except ValueError as exc:
        raise CentreError(str(exc)) from None
    path = export_model(_run_dir(args, args.run), args.round, Path(args.out) if args.out else None, use)
    print(path)  # stdout: the model file only, for scripts
    print("model card: " + "  ".join(str(card) for card in card_paths(path)), file=sys.stderr)
    if not use.provided:
        print("the model card's intended use is a placeholder: write it in a TOML file and export again with "
              "--use FILE (docs/predict.md, 'Model card')", file=sys.stderr)
    return 0


def cmd_plan_privacy(args: argparse.Namespace) -> int:
    from common.model import trainable_parameter_count
    from server.privacy_plan import federation_snr, measured_band, plan_site

    values: dict[str, object] = {"dp-enabled": True, "feature-norm": "site", "server-val-path": "(the centre's clinic)"}
    for flag, key in (("epsilon", "dp-target-epsilon"), ("delta", "dp-target-delta"), ("rounds", "num-rounds"),
                      ("local_epochs", "local-epochs"), ("batch", "batch-size"),
                      ("batch_fraction", "dp-batch-fraction")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    values.update(parse_assignments(args.set))
    config = RunConfig.from_mapping(values)
    units = [int(u) for u in args.units.split(",") if u.strip()]
    if not units or min(units) < 1:
        raise CentreError("--units takes the sites' training units, e.g. --units 100,500,2000")
    trainable = trainable_parameter_count(config.model)
    plans = [plan_site(config, n, trainable) for n in units]
    fraction = config.privacy.dp_batch_fraction
    batching = (f"each step samples {fraction:g} of a site's units" if fraction > 0
                else f"batch {config.train.batch_size}")
    table = Table(title=f"DP plan: epsilon {config.privacy.dp_target_epsilon:g} per site for the whole run, "
                        f"{config.federation.num_rounds} rounds x {config.train.local_epochs} local epochs, "
                        f"{batching}, {trainable:,} trainable parameters")
    for column in ("site", "units", "delta", "sample rate", "expected batch", "steps", "release sigma",
                   "DP-SGD sigma", "signal/noise per step", "signal/noise over the run"):
        table.add_column(column, justify="right")
    for i, p in enumerate(plans, 1):
        table.add_row(str(i), str(p.units), f"{p.delta:.1e}", f"{p.sample_rate:.3f}", f"{p.batch:.0f}", str(p.steps),
                      "-" if p.release_noise is None else f"{p.release_noise:.2f}", f"{p.noise_multiplier:.2f}",
                      f"{p.snr_step:.3f}", f"{p.snr_run:.2f}")
    console = wide_console()
    console.print(table)
    snr = federation_snr(plans)
    band = measured_band(snr)
    console.print(f"federation (FedAvg of the {len(plans)} sites): signal/noise over the run {snr:.2f}")
    console.print(f"AUC drop against no DP that the privacy-utility study measured near this ratio: {band.text}")
    if band.failed:
        console.print("[bold red]warning:[/] at this ratio the study's model did not learn (drop above "
                      "0.1): more units per site, more sites, a larger epsilon or fewer trainable parameters")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from server.report import print_report  # matplotlib only when plotting

    print_report(_run_dir(args, args.run), wide_console(), Path(args.out) if args.out else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinicfl-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("CLINICFL_HOME", "centre"),
                        help="the centre folder (default $CLINICFL_HOME or ./centre)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("certs", help="create the CA, the server certificate and site key pairs")
    p.add_argument("--host", action="append", default=[], help="a name or IP the sites dial (repeat)")
    p.add_argument("--site", action="append", default=[], help="make a key pair for this site (repeat)")
    p.add_argument("--new-ca", action="store_true", help="replace the CA (every site needs the new ca.crt)")
    p.set_defaults(func=cmd_certs)
    p = sub.add_parser("start", help="start the SuperLink (TLS, node authentication, database, log file)")
    p.add_argument("--address", default="0.0.0.0:9092", help="host:port to listen on (one port for everything)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (test networks only)")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("shutdown", help="stop the SuperLink")
    p.set_defaults(func=cmd_shutdown)
    p = sub.add_parser("register-site", help="allow a site's public key")
    p.add_argument("name")
    p.add_argument("pubkey")
    p.set_defaults(func=cmd_register_site)
    p = sub.add_parser("sites", help="registered sites and whether they are online")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sites)
    for name, func, text in (("run", cmd_run, "start a federation"),
                             ("resume", cmd_resume, "continue a run from its last finished round")):
        p = sub.add_parser(name, help=text)
        if name == "resume":
            p.add_argument("run", help="run id or run directory")
        p.add_argument("--rounds", type=int, help="num-rounds (total, counting the rounds already done)")
        p.add_argument("--min-sites", type=int)
        p.add_argument("--local-epochs", type=int)
        p.add_argument("--aggregation", choices=AGGREGATIONS)
        p.add_argument("--round-timeout", type=float)
        p.add_argument("--dp", action="store_true", help="DP-SGD at every site")
        p.add_argument("--dp-epsilon", type=float, help="dp-target-epsilon for the whole run")
        p.add_argument("--secure-aggregation", action="store_true",
                       help="SecAgg+: the centre sees only the sum of the sites' updates (docs/security.md)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
        if name == "run":
            p.add_argument("--app", help="the app folder to ship (default: this install); sites must approve it")
        p.set_defaults(func=func)
    p = sub.add_parser("bundle", help="the app bundle's sha256 (and the bundle file) for the sites to approve")
    p.add_argument("--app", help="the app folder (default: this install)")
    p.add_argument("--out", help="write the bundle file here")
    p.set_defaults(func=cmd_bundle)
    p = sub.add_parser("status", help="runs, or the per-round table of one run")
    p.add_argument("run", nargs="?", help="run id or run directory")
    p.set_defaults(func=cmd_status)
    for name, func, text in (("logs", cmd_logs, "the run's log"), ("stop", cmd_stop, "stop a run now"),
                             ("pause", cmd_pause, "pause after the current round"),
                             ("continue", cmd_continue, "continue a paused run")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="run id" if name in ("logs", "stop") else "run id or run directory")
        p.set_defaults(func=func)
    p = sub.add_parser("export", help="write the global model as one self-contained file")
    p.add_argument("run", help="run id or run directory")
    p.add_argument("--round", type=int, help="default: the best finished round (run config best-metric)")
    p.add_argument("--out")
    p.add_argument("--use", help="TOML file: intended-use, out-of-scope, intended-users, contact (the model card's "
                                 "intended use; a placeholder without it)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("report", help="write PNG plots of a run")
    p.add_argument("run", help="run id or run directory")
    p.add_argument("--out", help="folder for the PNGs (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("plan-privacy", help="what a DP run gives: noise and signal-to-noise per site, and the AUC "
                                            "drop the privacy study measured at that ratio")
    p.add_argument("--units", required=True, help="each site's training units, comma-separated, e.g. 100,500,2000")
    p.add_argument("--epsilon", type=float, help="dp-target-epsilon for the whole run")
    p.add_argument("--delta", type=float, help="dp-target-delta (default: 1 / (10 x units), at most 1e-5)")
    p.add_argument("--rounds", type=int, help="num-rounds")
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--batch", type=int, help="batch-size (used under DP only with --batch-fraction 0)")
    p.add_argument("--batch-fraction", type=float, help="dp-batch-fraction: the share of a site's units each DP-SGD "
                                                        "step samples")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
    p.set_defaults(func=cmd_plan_privacy)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CentreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
