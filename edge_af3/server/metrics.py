"""Prometheus metrics of the server, in their own registry: requests by path and status, queue
depth and requests in flight, time to first token, decode rate, audio seconds, tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, state):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edge_af3_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        g = Gauge(
            "edge_af3_queue_depth", "requests taken and waiting for a slot (being prepared or queued)", registry=r
        )
        g.set_function(lambda: state.scheduler.queued if state.scheduler else 0)
        g = Gauge("edge_af3_in_flight", "requests in a slot (prefilling or decoding)", registry=r)
        g.set_function(lambda: state.scheduler.in_flight if state.scheduler else 0)
        g = Gauge("edge_af3_slots", "slots (--parallel)", registry=r)
        g.set_function(lambda: len(state.scheduler.slots) if state.scheduler else 0)
        self.ttft = Histogram(
            "edge_af3_time_to_first_token_seconds",
            "from the request to its first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.rate = Histogram(
            "edge_af3_decode_tokens_per_second",
            "decode rate of each request",
            buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280),
            registry=r,
        )
        self.audio = Counter("edge_af3_audio_seconds", "seconds of audio in requests", registry=r)
        self.prompt = Counter("edge_af3_prompt_tokens", "prompt positions (text + audio)", registry=r)
        self.cached = Counter(
            "edge_af3_cached_prompt_tokens", "prompt positions reused from a slot's KV cache", registry=r
        )
        self.completion = Counter("edge_af3_completion_tokens", "generated tokens", registry=r)
        self.clips = Counter(
            "edge_af3_audio_clips", "clips in requests: encoded, or rows from the cache", ["source"], registry=r
        )
        self.batch = Histogram(
            "edge_af3_decode_batch_size",
            "slots advanced by each batched decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.finished = Counter("edge_af3_generations", "generations by finish reason", ["reason"], registry=r)

    def request(self, path: str, status: int) -> None:
        known = path in ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/models", "/health", "/metrics")
        self.requests.labels(path if known else "other", str(status)).inc()

    def job_done(self, job) -> None:
        """Called from the scheduler thread as each job ends."""
        if job.ttft_s is not None:
            self.ttft.observe(job.ttft_s)
        if len(job.tokens) > 1:
            self.rate.observe(job.decode_tokens_per_s)
        self.audio.inc(job.audio_seconds)
        self.prompt.inc(job.prompt_len)
        self.cached.inc(job.reused)
        self.completion.inc(len(job.tokens))
        self.finished.labels(job.finish_reason or "error").inc()
        self.clips.labels("encoded").inc(job.clips_encoded)
        self.clips.labels("cache").inc(job.clips_cached)

    def step(self, n: int) -> None:
        self.batch.observe(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
