"""Clusters as plain data, no Ray imported: the cluster files under cluster/ and fitting trials to nodes.

- `validate.py`: `raycls cluster validate FILE`, over `doc.py` (loading, the rule registries), `launcher.py`
  (Ray launcher YAMLs: Ray's schema and raycls's rules), `kuberay.py` (KubeRay manifests), `secrets.py`;
- `nodes.py`, `resources.py`, `preflight.py`: what a trial asks of the cluster, and refusing at start what
  could never run (node-local storage on several nodes, workers no node holds); the default concurrency.

`raycls.tune.cluster` connects to Ray and reads the live nodes these functions take.
"""
