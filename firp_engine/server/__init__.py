"""`firp serve`: an OpenAI-compatible HTTP server with continuous batching.

engine.py runs the model in one thread around a `Scheduler`; app.py holds the routes
(FastAPI, optional: `pip install 'firp-engine[serve]'`); schemas.py the request bodies;
metrics.py the Prometheus counters. Importing firp_engine needs none of them.
"""
