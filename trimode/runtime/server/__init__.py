"""`trimode serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

app.py (routes, auth) -> schemas.py (validated bodies) -> prompts.py (body ->
GenerationRequest) -> service.py (submit, relay events as JSON or SSE) -> scheduler.py (the
one thread that runs forwards: slots, FIFO queue, round robin) -> responses.py (OpenAI
bodies, timings). request_body.py bounds bodies; errors.py shapes every error; metrics.py
is /metrics.
"""
