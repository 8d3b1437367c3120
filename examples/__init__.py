"""Applications built on the library, beside it: `make demo` (`demo`), `make demo-agent`
(`demo_agent`), and `align-tiny-model` (`tiny_model`), the tiny random VLMs that tests, benchmarks
and demos build offline. Nothing in `server`, `trainer_client` or `protocol` imports them."""
