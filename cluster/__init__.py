"""Control plane: configuration, the `raylm` CLI, embedded Ray, job submission and the KubeRay client."""
