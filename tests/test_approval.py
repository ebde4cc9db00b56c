"""A hospital runs only the app bundles it approved (sitegate/), on a real loopback deployment:
TLS SuperLink with node authentication, two site daemons with approval on (the default).

- With the approved bundle, a run trains (after one site's gate was killed: its daemon restarts it).
- A one-line change to the ClientApp is another bundle: every site refuses it with
  app-not-approved, the centre records the refusal with the bundle's hash, and no code of the
  modified bundle ran at any site (its planted side effect, a file written on import, is absent).
- After the sites revoke the approval, the next run of the original bundle is refused too.

Each approved message runs from its own copy of the bundle, removed when it is done (nothing
installed is kept); tests/test_sitegate.py covers edited and half-finished copies and the
approvals list's owner and permissions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from benchmarks.loopback_deployment import ROOT, RUN_SETTINGS, Deployment
from simulations.synthetic import SyntheticSpec, generate_clinics

pytestmark = pytest.mark.slow  # a real TLS deployment (make test)

SITES = ["site-01", "site-02"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("approval")
    dep = Deployment(root)
    # 16 studies: each site keeps the 10 training studies the default site policy asks for beside its
    # validation and test patients.
    spec = SyntheticSpec(sites=len(SITES), studies_per_site=16, image_size=32, slices_per_study=4, seed=31)
    for name, path in zip(SITES, generate_clinics(root / "data", spec, progress=False)):
        dep.data[name] = path
    dep.server("certs", "--host", "localhost", *[a for n in SITES for a in ("--site", n)])
    dep.server("start", "--address", f"127.0.0.1:{dep.port}")
    for name in SITES:
        dep.server("register-site", name, str(dep.centre / "sites" / f"{name}.pub"))
    bundle = root / "clinicfl.fab"
    published = dep.server("bundle", "--out", str(bundle)).stdout.strip()  # the centre publishes its release
    for name in SITES:
        assert dep.approve(name, str(bundle)) == published  # each site reviews and approves that bundle
        dep.start_site(name)
    dep.wait_online(set(SITES))
    try:
        yield dep, published
    finally:
        dep.stop_all()


def _finish(dep: Deployment, run_id: int) -> list[dict]:
    dep.wait(lambda: dep.state(run_id).get("state") in ("finished", "stopped"), 600, f"run {run_id} to end")
    return dep.records(run_id)


def test_an_approved_bundle_trains(deployment):
    """Over real TLS, with secure aggregation: the sites' gates run Flower's secaggplus_mod."""
    dep, published = deployment
    # site-02's gate dies before the run: its daemon starts it again (else the site stays online, silent)
    daemon_log = dep.root / "site-02.daemon.log"
    os.killpg(int(daemon_log.read_text().split("gate pid ")[-1].split(",")[0]), signal.SIGKILL)
    dep.wait(lambda: "site gate ended" in daemon_log.read_text(), 60, "site-02's daemon to see its gate end")
    result = dep.server("run", "--rounds", "1", "--min-sites", "2", "--secure-aggregation", *RUN_SETTINGS)
    assert f"app bundle sha256 {published}" in result.stderr, "the centre prints the hash it ships"
    records = _finish(dep, int(result.stdout.split()[0]))
    assert [r["round"] for r in records] == [0, 1] and set(records[1]["train"]) == set(SITES)
    secure = records[1]["secure_aggregation"]
    assert records[1]["aggregated"] and secure["sites"] == 2 and secure["dropped"] == {}, records[1]["notes"]
    log = (dep.state_dir("site-01") / "logs" / "gate.log").read_text()
    assert f"sha256 {published}: approved" in log
    # every task was forked from the warm zygote, which had imported no code of the bundle
    assert "tasks forked from a warm zygote" in log and "zygote preloaded numpy, torch, torchvision" in log
    assert "1 bundle(s) approved" in log, "the gate trusted the approvals list at its start"
    # each message ran from its own copy of the bundle, removed once its reply was sent
    apps = dep.state_dir("site-01") / "apps"
    dep.wait(lambda: not any(apps.iterdir()), 60, "site-01's copies of the bundle to be removed")


def test_a_modified_bundle_is_refused_before_any_of_its_code_runs(deployment, tmp_path):
    dep, published = deployment
    app = tmp_path / "modified"
    for part in ("client", "common", "server"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    marker = tmp_path / "planted-side-effect"
    with (app / "client" / "app.py").open("a") as handle:  # the one-line change, run on import
        handle.write(f"\nopen({str(marker)!r}, 'w').write('the modified ClientApp ran')\n")
    result = dep.server("run", "--app", str(app), "--rounds", "1", "--min-sites", "2", *RUN_SETTINGS)
    modified = result.stderr.split("app bundle sha256 ")[1].split()[0]
    assert modified != published
    records = _finish(dep, int(result.stdout.split()[0]))
    reasons = {(r["site"], r["reason"]) for r in records[0]["rejected"]}
    assert reasons == {(s, f"site refused the app: app-not-approved (bundle sha256 {modified})") for s in SITES}
    assert dep.state(int(result.stdout.split()[0]))["state"] == "stopped"
    assert not marker.exists(), "no code of the modified bundle ran at a site"
    apps = dep.state_dir("site-01") / "apps"
    assert not apps.exists() or not any(apps.iterdir()), "it was not even unpacked"
    assert f"sha256 {modified}: REFUSED" in (dep.state_dir("site-02") / "logs" / "gate.log").read_text()


def test_revoking_the_approval_stops_the_next_run(deployment):
    dep, published = deployment
    for name in SITES:
        assert dep.client("revoke", published, "--state-dir", str(dep.state_dir(name))).returncode == 0
    listing = dep.client("approvals", "--state-dir", str(dep.state_dir("site-01"))).stdout
    assert published not in listing
    run_id = dep.run("run", "--rounds", "1", "--min-sites", "2", *RUN_SETTINGS)
    records = _finish(dep, run_id)
    assert {r["reason"] for r in records[0]["rejected"]} == {
        f"site refused the app: app-not-approved (bundle sha256 {published})"}
    assert not records[0]["evaluation"]
    assert json.loads((dep.run_dir(run_id) / "state.json").read_text())["state"] == "stopped"
