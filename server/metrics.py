"""Prometheus metrics of one server (own registry, so several apps can live in one test process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("align_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "align_request_seconds", "HTTP request latency", ["route"], registry=r,
            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.inflight = Gauge("align_inflight_requests", "requests being served", registry=r)
        self.prompts = Counter("align_prompts_total", "prompts generated for", registry=r)
        self.prompt_tokens = Counter("align_prompt_tokens_total", "prompt tokens (images expanded)", registry=r)
        self.completion_tokens = Counter("align_completion_tokens_total", "generated tokens", registry=r)
        self.weight_version = Gauge("align_weight_version", "weight version being served", registry=r)
        self.weight_syncs = Counter("align_weight_syncs_total", "weight syncs by outcome", ["outcome"], registry=r)
        self.cache_images = Gauge("align_image_cache_images", "images held in the cache", registry=r)
        self.cache_bytes = Gauge("align_image_cache_bytes", "decoded bytes held in the image cache", registry=r)
        self.images_received = Gauge("align_images_received", "encoded images and video frames received since "
                                     "start (those named by hash not counted)", registry=r)
        self.image_bytes_received = Gauge("align_image_bytes_received", "their encoded bytes", registry=r)
