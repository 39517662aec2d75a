"""The HTTP server: the Workers AI REST API with its Server-Sent Events, and OpenAI chat completions. It feeds
requests to the engine and shapes the engine's events; it never touches the model. Needs the `serve` extra."""
