"""`trimode serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

app.py (routes) -> prompts.py (body -> GenerationRequest) -> scheduler.py (the one thread
that runs forwards, slots and queue) -> responses.py (OpenAI bodies, SSE chunks).
"""
