"""The site gate: a hospital runs only the app bundles it has approved.

A Flower SuperNode runs whatever app bundle (FAB) the SuperLink ships it, with read access to the
site's data. With approval on (``clinicfl-client start``, the default), the SuperNode runs in
Flower's ``process`` isolation and starts no app process itself; this gate takes its tasks
instead. For every message it pulls the bundle, hashes its bytes and compares the hash with the
site's approved list *before any code of the bundle is imported*. A bundle that is not approved is
answered with Flower's ``INVALID_FAB`` error and the reason ``app-not-approved fab_hash=<sha256>``,
which the centre records; an approved one is unpacked from exactly those bytes into a fresh folder
of the task's own (no installed copy is ever reused) and run with Flower's ClientApp runtime. The
approved list is trusted only if the account that runs the bundles cannot change it
(sitegate/approvals.py).

This package imports only the standard library and Flower: the bundle's own ``client`` and
``common`` packages must be the ones that run, not the site's installed copies (Python would reuse
modules that are already imported).
"""
