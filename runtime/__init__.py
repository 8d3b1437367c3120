"""What both processes need from the machine and the pinned libraries, beside the wire contract
(`protocol/`): a model named by hub id or directory (`model_hub`), the KV cache vLLM gets on CPU
(`kv_cache`), the library notices dropped at their source (`quiet_logs`) and torchvision made
importable on the CPU torch (`torchvision_compat`).

`server` and `trainer_client` import this package and `protocol`, never each other. Importing it
installs the two start-up fixes, in every process that imports either side (vLLM's engine processes
too: a forked one inherits them, a spawned one re-imports the server's entry module first).
"""

from runtime import quiet_logs, torchvision_compat

quiet_logs.install()  # before anything imports vLLM (TRL does, in every mode)
torchvision_compat.install()  # before anything imports torchvision (transformers' processors, vLLM)
