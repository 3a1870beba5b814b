"""The vLLM engine, the side that runs in behaviorc's own process: the client (client,
http, push, named_vectors, lora, traffic), the server launcher (server) and the commands
(`behaviorc serve`, `behaviorc chat`). What vLLM loads into its processes is `inside`."""
