import quiet_logs

quiet_logs.install()  # before anything imports vLLM
