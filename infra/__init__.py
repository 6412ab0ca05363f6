"""infra: typed configuration, path resolution, model locations, the Ray/DeepSpeed runtime, the
`merg` CLI, and cluster and GPU scripts.

Doors: `infra.config`, `infra.runtime`, `infra.models`, the `merg` CLI (`infra.cli:main`).
"""
