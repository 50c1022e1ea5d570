"""Tests against a real container runtime (containerd + runc over CRI), with
the harness that plays kubelet (runtime.py)."""
