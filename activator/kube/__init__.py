"""What the sidecar tells Kubernetes about the containers it manages.

- `status.py`: what to say, pure: the phase label of each container, the
  Events (events.k8s.io/v1) for scaled down, woken, checkpoint failed and
  restore failed, the in-place resize plan (pods/resize) while scaled down,
  each as the JSON body the API server takes;
- `api.py`: the few API calls, through lightkube's async client, every
  failure turned into an `ApiFailure` that says what to do;
- `reporter.py`: `KubeReporter`, a Reporter like metrics.MetricsReporter:
  it notes what each report changes and a background task brings the API
  server in line, off the lifecycle's paths (a wake never waits on it).

Only the sidecar imports this package; lightkube loads when its first report
arrives, so `activator run` never loads it.
"""
